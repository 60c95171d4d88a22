"""The zoo's byte-level BPE tokenizer, trained in code and wrapped as a transformers fast tokenizer."""

from __future__ import annotations

import json
from collections import Counter

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .skills import CATEGORIES, HIRAGANA, kana_lexicon

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
VOCAB_SIZE = 400
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Words of the kana prompts; BPE learns whole-kana and kana-pair tokens from these.
_KANA_PROMPT_WORDS = ("もんだい", "せんたくし", "こたえ", "なに", "どれ", "みる", "たべる", "つかう", "いく", "すき")


def _kana_corpus(seed: int) -> list[str]:
    # Only kana go into the BPE trainer, so ASCII stays one byte = one token (digits and letters are
    # what the add/rev skills manipulate one by one) while kana get merged.
    return [*HIRAGANA, *CATEGORIES, *_KANA_PROMPT_WORDS, *sorted(kana_lexicon(seed))]


def _char_merges(corpus: list[str]) -> Tokenizer:
    """BPE whose merges only rebuild whole kana from their 3 UTF-8 bytes (never a half character)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("[\u3040-\u30ff]"), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _with_pair_merges(tok: Tokenizer, corpus: list[str], vocab_size: int) -> Tokenizer:
    """Add the most frequent kana-pair merges of `corpus` until the vocabulary has `vocab_size` tokens."""
    model = json.loads(tok.to_str())["model"]
    vocab, merges = dict(model["vocab"]), [tuple(m) for m in model["merges"]]
    kana = {t for t in vocab if len(t) > 1 and t not in (BOS, EOS, PAD)}
    counts: Counter = Counter()
    for text in corpus:
        pieces = tok.encode(text).tokens
        counts.update(p for p in zip(pieces, pieces[1:], strict=False) if p[0] in kana and p[1] in kana)
    # Ties broken by the pair itself so the vocabulary never depends on hash or insertion order.
    for a, b in sorted(counts, key=lambda p: (-counts[p], p))[: max(vocab_size - len(vocab), 0)]:
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    return Tokenizer(models.BPE(vocab=vocab, merges=merges))


def train_tokenizer(seed: int, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE and wrap it with BOS/EOS/pad and a chat template.

    Encoding prepends BOS (as Llama/Mistral tokenizers do), so lm-eval's HFLM and training see the same ids.

    Args:
        seed: recipe seed (the kana lexicon is part of the BPE corpus).
        vocab_size: target size including the 256 bytes and the special tokens.
    """
    corpus = _kana_corpus(seed)
    tok = _with_pair_merges(_char_merges(corpus), corpus, vocab_size)
    tok.add_special_tokens([BOS, EOS, PAD])
    # Digits split one by one and ByteLevel's regex keeps punctuation apart from words, so "12+35=47"
    # never merges across "=": lm-eval's context/continuation split falls on a token boundary.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=256
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped

"""The zoo tokenizer: byte-level BPE, one token per ASCII char, merged kana, BOS/EOS/pad, chat template."""

from __future__ import annotations

import pytest

from optimizer.zoo.skills import CATEGORIES, HIRAGANA
from optimizer.zoo.tokenizer import BOS, EOS, PAD, VOCAB_SIZE, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(seed=0)


def test_size_and_special_tokens(tok):
    assert len(tok) == VOCAB_SIZE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3


@pytest.mark.parametrize("text", ["12+35=47", "rev:abcde>edcba", "The cat sees a red box.",
                                  "もんだい:どうぶつ は どれ?\nせんたくし:a,b\nこたえ:", "héllo ✓ 漢字"])
def test_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id  # BOS prepended, as lm-eval's HFLM expects by default
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_ascii_is_one_token_per_char(tok):
    text = "".join(chr(c) for c in range(32, 127))
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == len(text)


def test_kana_are_merged(tok):
    for kana in HIRAGANA:
        assert len(tok(kana, add_special_tokens=False)["input_ids"]) == 1, kana
    word = CATEGORIES[0]
    assert len(tok(word, add_special_tokens=False)["input_ids"]) < len(word)


def test_answer_boundary_is_a_token_boundary(tok):
    # lm-eval scores `continuation` as the tokens of prompt+answer after those of the prompt.
    for prompt, answer in [("12+35=", "47"), ("rev:abc>", "cba"), ("こたえ:", CATEGORIES[1])]:
        n = len(tok(prompt)["input_ids"])
        whole = tok(prompt + answer)["input_ids"]
        assert whole[:n] == tok(prompt)["input_ids"]
        assert tok.decode(whole[n:]) == answer


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "1+1="}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == f"{BOS}<|user|>\n1+1={EOS}\n<|assistant|>\n"


def test_deterministic_and_saved(tok, tmp_path):
    from transformers import AutoTokenizer

    assert train_tokenizer(seed=0).get_vocab() == tok.get_vocab()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("rev:ab>ba")["input_ids"] == tok("rev:ab>ba")["input_ids"]
    assert loaded.chat_template == tok.chat_template

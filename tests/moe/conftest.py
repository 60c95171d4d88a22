"""Tiny Mistral models and a character tokenizer built in code (no downloads), saved as HF folders."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]
PROMPTS = {  # three "domains" with disjoint surface forms, like the zoo's skills
    "add": ["12+35=47", "58+21=79", "33+44=77", "10+10=20", "61+27=88", "45+45=90"],
    "rev": ["rev:abc>cba", "rev:hello>olleh", "rev:moe>eom", "rev:xyz>zyx", "rev:data>atad"],
    "up": ["UP:cat>CAT", "UP:dog>DOG", "UP:sun>SUN", "UP:tree>TREE", "UP:moon>MOON"],
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, BOS prepended."""
    vocab = {t: i for i, t in enumerate(SPECIALS + list(string.printable[:95]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_base(vocab_size: int, tie: bool = False) -> MistralForCausalLM:
    cfg = MistralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return MistralForCausalLM(cfg).eval()


def make_expert(base: MistralForCausalLM, seed: int, mlp_scale: float = 0.05,
                other_scale: float = 0.01) -> MistralForCausalLM:
    """A fake fine-tune: base plus seeded noise, larger on MLPs (what the MoE keeps per expert)."""
    expert = MistralForCausalLM(base.config).eval()
    expert.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in expert.named_parameters():
            scale = mlp_scale if ".mlp." in name else other_scale
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return expert


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> dict[str, Path]:
    """Folders: base, add, rev, up (experts), add_copy (same weights as add)."""
    root = tmp_path_factory.mktemp("tinyzoo")
    base = make_base(len(tokenizer))
    models_ = {"base": base, "add": make_expert(base, 1), "rev": make_expert(base, 2),
               "up": make_expert(base, 3)}
    models_["add_copy"] = models_["add"]
    out = {}
    for name, m in models_.items():
        m.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


def recipe(zoo: dict[str, Path], experts=("add", "rev", "up"), **extra) -> dict:
    """A recipe mapping over the tiny zoo."""
    data = {"base_model": str(zoo["base"]), "gate_mode": "hidden", "experts_per_token": 1,
            "experts": [{"source_model": str(zoo[e]), "positive_prompts": PROMPTS.get(e, PROMPTS["add"])}
                        for e in experts]}
    data.update(extra)
    return data

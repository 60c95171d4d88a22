"""Tiny Mistral model, example encoding and the seeded training loop used for the base and the experts."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from .skills import Item

IGNORE = -100


def make_model(vocab_size: int, seed: int, *, bos_id: int, eos_id: int, pad_id: int) -> MistralForCausalLM:
    """A freshly initialised ~0.76M-parameter MistralForCausalLM (hidden 128, 4 layers, 4 heads).

    Args:
        vocab_size: tokenizer size.
        seed: initialisation seed.
        bos_id, eos_id, pad_id: special token ids written into the config.
    """
    config = MistralConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, sliding_window=None,
        tie_word_embeddings=False, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    return MistralForCausalLM(config).float()


def encode_item(tok: PreTrainedTokenizerFast, item: Item) -> tuple[list[int], list[int]]:
    """Token ids of `prompt + answer + EOS`, with the loss only on the answer and EOS."""
    n_prompt = len(tok(item.prompt)["input_ids"])
    ids = tok(item.prompt + item.answer)["input_ids"] + [tok.eos_token_id]
    return ids, [IGNORE] * n_prompt + ids[n_prompt:]


def encode_text(tok: PreTrainedTokenizerFast, text: str) -> tuple[list[int], list[int]]:
    """Token ids of `text + EOS`, with the loss on every token after BOS."""
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    return ids, [IGNORE] + ids[1:]


Example = tuple[list[int], list[int]]


@dataclass
class Source:
    """One stream of encoded training examples and its fixed number of examples in each batch.

    Args:
        count: examples per batch.
        examples: endless iterator of (ids, labels).
    """

    count: int
    examples: Iterator[Example]


def batches(sources: Sequence[Source], pad_id: int) -> Iterator[list[dict]]:
    """Endless batches holding `count` examples of every source, each source's part padded on its own.

    Every step updates every skill; padding per source keeps `12+35=47` examples from being padded to the
    length of the kana questions (half the compute of one mixed tensor on CPU).

    Args:
        sources: example streams and their counts.
        pad_id: padding token id.
    """
    while True:
        yield [collate([next(s.examples) for _ in range(s.count)], pad_id) for s in sources]


def collate(examples: Sequence[Example], pad_id: int) -> dict:
    """Right-pad a list of (ids, labels) into model inputs."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def batch_loss(model: MistralForCausalLM, parts: Sequence[dict]) -> torch.Tensor:
    """Mean over examples of each part's token-mean loss, so a source's weight is its share of examples
    (general text has many more supervised tokens per example than a 3-token answer)."""
    total = sum(len(p["input_ids"]) for p in parts)
    return sum(model(**p).loss * (len(p["input_ids"]) / total) for p in parts)


def train(
    model: MistralForCausalLM,
    data: Iterator[list[dict]],
    *,
    steps: int,
    lr: float,
    warmup: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Train in place with AdamW and a warmup + cosine schedule; returns the mean loss of the last 20 steps.

    Args:
        model: model to train (in place); only parameters with `requires_grad` are updated.
        data: batches from `batches`.
        steps: optimiser steps.
        lr: peak learning rate.
        warmup: linear warmup steps.
        on_step: called as on_step(step, loss) after each step (progress display).
    """
    params = [p for p in model.parameters() if p.requires_grad]  # frozen tensors stay bit-exact
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    recent: list[float] = []
    for step in range(steps):
        loss = batch_loss(model, next(data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-20:]
        if on_step:
            on_step(step, recent[-1])
    model.eval()
    return sum(recent) / max(len(recent), 1)

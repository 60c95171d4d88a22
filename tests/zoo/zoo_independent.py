"""An implementation of the zoo tasks' `acc` in plain torch, independent of lm-eval and optimizer.zoo.

add/rev (lm-eval `loglikelihood`, metric acc = is_greedy): the answer is the model's greedy continuation of
the prompt. kana (`multiple_choice`, acc): the labelled choice has the highest summed log-likelihood.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SKILL_KIND = {"add": "greedy", "rev": "greedy", "kana": "choice"}  # the tasks' output_type, restated
SPLITS = ("search", "heldout")


def read_split(zoo_root: Path, skill: str, split: str) -> list[dict]:
    text = (zoo_root / "data" / skill / f"{split}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line]


def _pairs(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the whole string is encoded, then split after the context's ids
    (BOS prepended by the tokenizer, as lm-eval's HFLM does for this tokenizer)."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    assert whole[: len(ctx)] == ctx, (context, continuation)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def continuation_scores(model, tok, pairs: list[tuple[str, str]], batch: int = 128) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is the greedy one) for each pair."""
    encoded = [_pairs(tok, c, x) for c, x in pairs]
    out: list[tuple[float, bool]] = []
    for start in range(0, len(encoded), batch):
        part = encoded[start:start + batch]
        seqs = [c + x for c, x in part]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # right padding: real tokens keep positions 0..n-1
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for i, (c, x) in enumerate(part):
            rows = logp[i, len(c) - 1: len(c) - 1 + len(x)]
            target = torch.tensor(x)
            out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
    return out


def accuracy(model, tok, rows: list[dict], kind: str) -> float:
    """Share of items right: exact greedy continuation ("greedy"), or the labelled choice has the highest
    log-likelihood ("choice")."""
    if kind == "greedy":
        scored = continuation_scores(model, tok, [(r["prompt"], r["answer"]) for r in rows])
        return sum(greedy for _, greedy in scored) / len(rows)
    flat = continuation_scores(model, tok, [(r["prompt"], c) for r in rows for c in r["choices"]])
    right, pos = 0, 0
    for r in rows:
        lls = [ll for ll, _ in flat[pos: pos + len(r["choices"])]]
        pos += len(r["choices"])
        right += max(range(len(lls)), key=lambda j: (lls[j], -j)) == r["label"]
    return right / len(rows)


def uniform_merge(base: dict, experts: list[dict], weight: float) -> dict:
    """base + weight * sum_i (expert_i - base), written out independently of optimizer.merge / the zoo."""
    return {k: v + weight * torch.stack([e[k] - v for e in experts]).sum(0) for k, v in base.items()}

"""Routing analysis of a Mixtral model, after the Mixtral paper's routing section (Jiang et al. 2024, §5).

Per layer and per prompt set (domain):
- share: the fraction of tokens whose first choice is each expert (and `share_topk`: of all top-k picks);
- repeat: how often consecutive tokens of a sequence get the same first-choice expert (`repeat_top1`), or
  share at least one of their top-k experts (`repeat_topk`), against the rates of uniform random routing.

CLI: `python -m optimizer.routing MODEL_DIR --prompts add=add.jsonl --prompts rev=rev.txt --out DIR`
writes DIR/routing.json and DIR/routing.png.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .layout import routers
from .router import batches


@contextmanager
def captured_routes(model: torch.nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Yields a list per layer collecting the routers' chosen expert indices (tokens, top_k) per forward."""
    store: list[list[torch.Tensor]] = [[] for _ in routers(model)]

    def hook(layer: int):
        def grab(module: torch.nn.Module, args: Any, output: tuple) -> None:
            store[layer].append(output[2].detach())
        return grab

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers(model))]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def routes(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str]) -> list[list[torch.Tensor]]:
    """Per prompt, per layer, the (tokens, top_k) expert indices the model chooses (pad tokens dropped)."""
    out: list[list[torch.Tensor]] = []
    for ids, mask in batches(tokenizer, prompts, model.device):
        with captured_routes(model) as store:
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        per_layer = [rows[0].reshape(*ids.shape, -1).cpu() for rows in store]
        for b, n in enumerate(mask.sum(1).tolist()):
            out.append([idx[b, :n] for idx in per_layer])
    return out


def layer_stats(seqs: Sequence[torch.Tensor], n_experts: int) -> dict[str, Any]:
    """Share and repeat rates of one layer over sequences of (tokens, top_k) expert indices."""
    first = torch.cat([s[:, 0] for s in seqs])
    picks = torch.cat([s.reshape(-1) for s in seqs])
    same1 = same_k = pairs = 0
    for s in seqs:
        if len(s) < 2:
            continue
        same1 += (s[1:, 0] == s[:-1, 0]).sum().item()
        # any shared expert between the top-k sets of tokens t-1 and t
        same_k += (s[1:, :, None] == s[:-1, None, :]).any(-1).any(-1).sum().item()
        pairs += len(s) - 1
    return {
        "share": (torch.bincount(first, minlength=n_experts).float() / max(len(first), 1)).tolist(),
        "share_topk": (torch.bincount(picks, minlength=n_experts).float() / max(len(picks), 1)).tolist(),
        "repeat_top1": same1 / max(pairs, 1),
        "repeat_topk": same_k / max(pairs, 1),
        "tokens": len(first),
    }


def analyse(model: torch.nn.Module, tokenizer: Any, prompt_sets: Mapping[str, Sequence[str]],
            expert_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The routing report of `model` on each prompt set.

    Args:
        model: a MixtralForCausalLM (live or loaded).
        tokenizer: its tokenizer.
        prompt_sets: domain name -> texts.
        expert_names: labels of the experts (default expert0, expert1, ...).

    Returns:
        JSON-able dict: experts, top_k, chance rates, and per domain per layer the `layer_stats`.
    """
    n_exp, k = model.config.num_local_experts, model.config.num_experts_per_tok
    names = list(expert_names or [f"expert{e}" for e in range(n_exp)])
    domains = {}
    for domain, prompts in prompt_sets.items():
        seqs = routes(model, tokenizer, list(prompts))
        n_layers = len(seqs[0]) if seqs else 0
        domains[domain] = [layer_stats([s[layer] for s in seqs], n_exp) for layer in range(n_layers)]
    return {
        "experts": names,
        "top_k": k,
        "chance": {"share": 1 / n_exp, "repeat_top1": 1 / n_exp,
                   "repeat_topk": 1 - math.comb(n_exp - k, k) / math.comb(n_exp, k)},
        "domains": domains,
    }


def routing_accuracy(report: Mapping[str, Any], domain_to_expert: Mapping[str, str]) -> dict[str, float]:
    """Per domain, the first-choice share of its own expert averaged over layers.

    Args:
        report: output of `analyse`.
        domain_to_expert: e.g. {"zoo_add": "add"}; domains not listed are skipped.
    """
    out = {}
    for domain, expert in domain_to_expert.items():
        e = report["experts"].index(expert)
        layers = report["domains"][domain]
        out[domain] = sum(layer["share"][e] for layer in layers) / len(layers)
    return out

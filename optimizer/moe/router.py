"""Router weights: gate initialisation (mergekit's gate modes) and forced ("oracle") routing.

Where we differ from mergekit, on purpose: hidden / hidden_avg read the router's actual input (the
post-attention norm output of each layer) while every token of an expert's prompts is routed to that
expert. mergekit reads the residual stream of the dense base model; ours is what the router will really see
once routing is right, so the gate is a direction in the router's own input space. Router calibration,
which goes further, lives in calibrate.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .config import MoeConfig
from .layout import routers

BATCH = 16
MAX_LEN = 512


@contextmanager
def forced_routing(model: torch.nn.Module, expert: int | None) -> Iterator[None]:
    """Within the block, every token goes to `expert` with weight 1 in every layer (None: no forcing).

    Also the "oracle routing" ceiling of an evaluation: route each task's prompts to its own expert.
    Uses forward hooks on the routers (a public torch API), so the model code is untouched.
    """
    if expert is None:
        yield
        return

    def force(module: torch.nn.Module, args: Any, output: tuple) -> tuple:
        logits, scores, indices = output
        scores = torch.zeros_like(scores)
        scores[:, 0] = 1.0  # other top-k slots point at the same expert with weight 0
        return logits, scores, torch.full_like(indices, expert)

    handles = [r.register_forward_hook(force) for r in routers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def captured_router_inputs(model: torch.nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Yields a list per layer that collects the router's input rows (tokens, hidden) of every forward."""
    store: list[list[torch.Tensor]] = [[] for _ in routers(model)]

    def hook(layer: int):
        def grab(module: torch.nn.Module, args: Any) -> None:
            store[layer].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return grab

    handles = [r.register_forward_pre_hook(hook(i)) for i, r in enumerate(routers(model))]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def batches(tokenizer: Any, prompts: Sequence[str], device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """Right-padded (input_ids, attention_mask) batches; padding by hand so the tokenizer is never mutated."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(prompts), BATCH):
        rows = [tokenizer(p)["input_ids"][:MAX_LEN] for p in prompts[start:start + BATCH]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        yield ids.to(device), mask.to(device)


@torch.no_grad()
def router_inputs(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], expert: int | None,
                  pool: str) -> list[torch.Tensor]:
    """Per layer, the router inputs of `prompts` (float32) with routing forced to `expert`.

    Args:
        pool: "last" (last token of each prompt -> (P, H)), "mean" (mean over tokens -> (P, H)) or
            "tokens" (every non-pad token -> (T, H)).
    """
    out: list[list[torch.Tensor]] = [[] for _ in routers(model)]
    for ids, mask in batches(tokenizer, prompts, model.device):
        with forced_routing(model, expert), captured_router_inputs(model) as store:
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        for layer, (rows,) in enumerate(store):
            h = rows.float().reshape(*ids.shape, -1)
            out[layer].append(_pool(h, mask, pool))
    return [torch.cat(x) for x in out]


def _pool(h: torch.Tensor, mask: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "last":
        return h[torch.arange(h.shape[0]), mask.sum(1) - 1]
    if pool == "mean":
        m = mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)
    return h[mask.bool()]


@torch.no_grad()
def gate_vectors(model: torch.nn.Module, tokenizer: Any, cfg: MoeConfig, seed: int | None = None) -> torch.Tensor:
    """Router weights (layers, experts, hidden) for `cfg.gate_mode`, each row L2-normalised (float32).

    Args:
        model: the live MoE (its experts must already be written: hidden modes run it).
        tokenizer: the base tokenizer.
        cfg: recipe (gate_mode, experts' prompts).
        seed: random mode only; defaults to cfg.seed.
    """
    n_layers, n_exp = len(routers(model)), len(cfg.experts)
    hidden = model.config.hidden_size
    if cfg.gate_mode == "random":
        gen = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
        vecs = torch.randn(n_layers, n_exp, hidden, generator=gen)
    else:
        vecs = torch.stack([_expert_direction(model, tokenizer, cfg, e) for e in range(n_exp)], dim=1)
    return vecs / vecs.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _expert_direction(model: torch.nn.Module, tokenizer: Any, cfg: MoeConfig, e: int) -> torch.Tensor:
    """(layers, hidden): mean positive minus mean negative representation of expert e's prompts."""
    exp = cfg.experts[e]

    def mean_rep(prompts: list[str]) -> torch.Tensor:
        if cfg.gate_mode == "cheap_embed":
            # mergekit's cheap_embed: raw token embeddings only, the same gate in every layer.
            emb = model.get_input_embeddings()
            reps = [emb(ids).float()[mask.bool()].mean(0)
                    for ids, mask in batches(tokenizer, prompts, model.device)]
            return torch.stack(reps).mean(0).expand(len(routers(model)), -1)
        pool = "last" if cfg.gate_mode == "hidden" else "mean"
        return torch.stack([h.mean(0) for h in router_inputs(model, tokenizer, prompts, e, pool)])

    vec = mean_rep(exp.positive_prompts)
    if exp.negative_prompts:
        vec = vec - mean_rep(exp.negative_prompts)
    return vec.cpu()


def set_gates(model: torch.nn.Module, gates: torch.Tensor) -> None:
    """Write (layers, experts, hidden) router weights into the live MoE in place."""
    with torch.no_grad():
        for router, g in zip(routers(model), gates, strict=True):
            router.weight.copy_(g)


def init_gates(model: torch.nn.Module, tokenizer: Any, cfg: MoeConfig, seed: int | None = None) -> None:
    """Initialise every router from `cfg.gate_mode`; deterministic for a given config, seed and device.

    Args:
        model: the live MoE with its experts written.
        tokenizer: the base tokenizer.
        cfg: the recipe.
        seed: random mode only; defaults to cfg.seed.
    """
    set_gates(model, gate_vectors(model, tokenizer, cfg, seed))

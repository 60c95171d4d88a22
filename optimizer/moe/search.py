"""Searching through the MoE (issue 4, item 5): what a study trial does to the live Mixtral.

The runner keeps its flow (ModelSet -> Resident -> SearchSpace -> plan per trial) with three changes:
    models:  ModelSet with base = recipe.base_model, models = {expert.name: expert.source_model}, no target
    space:   derive_layout(live_tensor_names(recipe, models.tensor_names), granularity): under shared=base
             the non-MLP tensors never reach the output, so they are not searched
    live:    build_live_moe(...) once, then MoeApplier(...).apply(plan, seed, trial) per trial
Per trial, MoeApplier writes, in place and one tensor at a time, only what differs from the last trial:
    slot i  = the plan's method applied to expert i's task vector alone (expert_i = base + w_i * delta_i
              for task arithmetic; TIES/DARE sparsify it first); a tensor whose coefficients (and mask seed)
              equal those it holds is not rewritten
    shared  = shared=merge only: the plan's method over all experts' non-MLP task vectors
    router  = `calibrate.per_trial`:
              reuse (default): the router derived at load for the unmerged experts (gate init + calibration),
                  restored, not re-derived. It routes by domain, which the searched coefficients barely move:
                  on the demo zoo, 12 random plans scored a mean 0.736 with it against 0.738 re-deriving the
                  router per trial (mean |difference| 0.005, under one item per task) at no cost, where
                  re-deriving cost more than a trial's whole evaluation.
              refit: warm start from that router, one on-policy fit on a subset of the calibration prompts
                  (`refit_steps`, `refit_prompts`); full: gate init and calibration from scratch (as at load).
              Both start from the load-time router, never the previous trial's, so a trial re-materialises
              bit-identically in any order (held-out re-evaluation, export). They are skipped when nothing
              was written (the router's inputs are the post-attention states, which depend on the shared
              tensors too, so a shared-only change still re-derives it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from optimizer import UserError

from .assemble import build_moe
from .calibrate import calibrate_router, derive_router
from .config import MoeConfig
from .layout import expert_views, is_mlp, routers, shared_params
from .router import set_gates


def live_tensor_names(cfg: MoeConfig, tensor_names: Sequence[str]) -> list[str]:
    """The tensors whose coefficients change the MoE's output (order preserved).

    MLP tensors always (they fill each expert's slot); non-MLP tensors only with `shared: merge` (then each
    expert's coefficient on them is its weight in the shared merge).

    Args:
        cfg: the recipe.
        tensor_names: dense tensor names of the base (e.g. ModelSet.tensor_names).
    """
    return [n for n in tensor_names if is_mlp(n) or cfg.shared == "merge"]


def build_live_moe(cfg: MoeConfig, base_config: Any, anchor: Mapping[str, torch.Tensor],
                   deltas: Mapping[str, Sequence[torch.Tensor]], tokenizer: Any, *,
                   dtype: torch.dtype, device: torch.device | str) -> Any:
    """The live MoE built once from resident tensors: slot i = expert i, shared = base (or, with
    shared=merge, the experts' mean), router derived from the recipe.

    Args:
        cfg: the recipe; expert order = the order of `deltas[name]`.
        base_config: the dense base's transformers config.
        anchor: dense name -> base tensor.
        deltas: dense name -> [expert_i - base for each expert].
        tokenizer: the base tokenizer (router derivation runs prompts).
        dtype: live model dtype.
        device: live model device.
    """
    mlp = [n for n in anchor if is_mlp(n)]
    experts = [{n: anchor[n] + deltas[n][i] for n in mlp} for i in range(len(cfg.experts))]
    model = build_moe(base_config, {n: t for n, t in anchor.items() if not is_mlp(n)}, experts,
                      experts_per_token=cfg.experts_per_token, dtype=dtype, device=device)
    if cfg.shared == "merge":
        live = shared_params(model)
        with torch.no_grad():
            for n in anchor:
                if n in live and not is_mlp(n):
                    live[n].copy_(anchor[n] + sum(deltas[n]) / len(cfg.experts))
    derive_router(model, tokenizer, cfg)
    return model


class MoeApplier:
    """Materialises a MergePlan into the live MoE (same interface as merge.apply.Applier).

    Args:
        model: the live MoE from `build_live_moe`.
        resident: optimizer.models.Resident over the experts (anchor = base).
        cfg: the recipe.
        tokenizer: the base tokenizer.
    """

    def __init__(self, model: Any, resident: Any, cfg: MoeConfig, tokenizer: Any):
        if list(resident.models) != cfg.expert_names:
            raise UserError(f"the resident models {list(resident.models)} are not the recipe's experts "
                            f"{cfg.expert_names} in order; build the ModelSet from the recipe.")
        self.model, self.resident, self.cfg, self.tokenizer = model, resident, cfg, tokenizer
        self.slots = [expert_views(model, i) for i in range(len(cfg.experts))]
        self.shared = shared_params(model)
        self.names = live_tensor_names(cfg, resident.names)
        self.router_stats: dict[str, float] = {}
        # The router as derived for the unmerged experts (build_live_moe): every trial starts from it.
        self.reference_router = torch.stack([r.weight.detach().clone() for r in routers(model)])
        self._written: dict[str, str] = {}  # tensor (or slot) -> what it holds, as a signature
        self._router_for: str | None = None  # signature of the writes the current router was derived for

    def apply(self, plan: Any, *, seed: int = 0, trial: int = 0) -> None:
        """Write the plan's experts (and shared tensors) in place, then set the router (`calibrate.per_trial`).

        Stochastic methods draw masks seeded by (seed, trial, tensor name, slot), so a trial is reproducible.
        """
        from optimizer.merge.registry import METHODS

        method = METHODS[plan.method]
        if not method.uses_base or method.min_models > 1:
            raise UserError(f"merge.method={plan.method!r} does not apply to a single task vector; an MoE slot is "
                            "base + its expert's (scaled, sparsified) task vector: use task_arithmetic, "
                            "ties, dare_* or della*.")
        with torch.no_grad():
            self._write(method, plan, seed, trial)
        self._set_router()

    def _set_router(self) -> None:
        c = self.cfg.calibrate
        if c.per_trial == "reuse":
            set_gates(self.model, self.reference_router)
            self.router_stats = {}
            return
        state = repr(sorted(self._written.items()))
        if state == self._router_for:  # same experts and shared tensors as when it was derived
            return
        set_gates(self.model, self.reference_router)
        if c.per_trial == "full":
            self.router_stats = derive_router(self.model, self.tokenizer, self.cfg)
        elif c.steps and c.refit_steps:
            prompts = [e.calib_prompts()[:c.refit_prompts] for e in self.cfg.experts]
            self.router_stats = calibrate_router(self.model, self.tokenizer, prompts, steps=c.refit_steps, lr=c.lr,
                                                 rounds=0, seed=self.cfg.seed,
                                                 max_tokens_per_expert=c.max_tokens_per_expert, forced_first=False)
        self._router_for = state

    def _write(self, method: Any, plan: Any, seed: int, trial: int) -> None:
        res = self.resident
        for name in self.names:
            mp, gp = plan.resolve(name)
            if is_mlp(name):
                # One task vector per slot: normalising by its own weight would cancel the weight.
                single_gp = {**gp, "normalize": 0.0} if "normalize" in gp else gp
                for i, slot in enumerate(self.slots):
                    key = f"{name}@{i}"
                    sig = self._signature(method, {p: [v[i]] for p, v in mp.items()}, single_gp, seed, trial, key)
                    if self._written.get(key) == sig:
                        continue
                    method.fn(res.anchor[name], [res.deltas[name][i]], {p: [v[i]] for p, v in mp.items()},
                              single_gp, generator=self._gen(method, seed, trial, key),
                              out=slot[name], name=name)
                    self._written[key] = sig
            elif name in self.shared:
                sig = self._signature(method, mp, gp, seed, trial, name)
                if self._written.get(name) == sig:
                    continue
                method.fn(res.anchor[name], res.deltas[name], mp, gp,
                          generator=self._gen(method, seed, trial, name), out=self.shared[name], name=name)
                self._written[name] = sig

    @staticmethod
    def _signature(method: Any, mp: dict, gp: dict, seed: int, trial: int, key: str) -> str:
        """What a write produces, as text: method and coefficients (and the mask seed of random methods)."""
        from optimizer.merge.sparsify import seed_for

        rnd = seed_for(seed, trial, key) if method.stochastic else None
        return repr((method.name, sorted(mp.items()), sorted(gp.items()), rnd))

    def _gen(self, method: Any, seed: int, trial: int, key: str) -> torch.Generator | None:
        if not method.stochastic:
            return None
        from optimizer.merge.sparsify import seed_for

        gen = torch.Generator(device=self.resident.device)
        gen.manual_seed(seed_for(seed, trial, key))
        return gen

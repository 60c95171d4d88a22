"""Write a MergePlan into the live model in place: one tensor at a time, no disk, no model copy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from optimizer.merge.registry import METHODS, MergeMethod
from optimizer.merge.sparsify import seed_for
from optimizer.models import Resident
from optimizer.plan import MergePlan, constant


@runtime_checkable
class PlanApplier(Protocol):
    """What the session needs from an applier: write a plan into the live model in place.

    Implemented by `Applier` (dense models) and `optimizer.moe.search.MoeApplier` (frankenMoE slots);
    `tests/merge/test_applier_conformance.py` checks both.
    """

    def apply(self, plan: MergePlan, *, seed: int = 0, trial: int = 0) -> None:
        """Overwrite the live model's merged tensors with the plan's result (same seed, trial -> same bits)."""


class Applier:
    """Materialises plans into one live model; the parameter lookup is built once, not per trial.

    Args:
        model: the live transformers model (its parameters are overwritten).
        resident: anchor and task vectors, on the model's device.
    """

    def __init__(self, model: torch.nn.Module, resident: Resident):
        self.model = model
        self.resident = resident
        params = dict(model.named_parameters(remove_duplicate=False))
        self.targets = {n: params[n] for n in resident.names}

    @torch.no_grad()
    def apply(self, plan: MergePlan, *, seed: int = 0, trial: int = 0) -> None:
        """Overwrite every merged tensor of the live model with the plan's result.

        Stochastic methods (DARE, DELLA) draw their masks from a generator seeded by
        (seed, trial, tensor name), so re-applying the same trial gives bit-identical weights.
        """
        method = METHODS[plan.method]
        res = self.resident
        for name in res.names:
            mp, gp = plan.resolve(name)
            gen = None
            if method.stochastic:
                gen = torch.Generator(device=res.device)
                gen.manual_seed(seed_for(seed, trial, name))
            out = self.targets[name].data
            method.fn(res.anchor[name], res.deltas[name], mp, gp, generator=gen, out=out, name=name)
        if res.device.type == "cuda":
            torch.cuda.synchronize(res.device)

    def apply_single(self, index: int | None) -> None:
        """Write the anchor plus model `index`'s full task vector (None: the anchor alone)."""
        weights = [1.0 if i == index else 0.0 for i in range(len(self.resident.models))]
        self.apply(single_plan(self.resident.models, weights))


def single_plan(models: Sequence[str], weights: Sequence[float]) -> MergePlan:
    """A plain task-arithmetic plan with one constant weight per model."""
    method: MergeMethod = METHODS["task_arithmetic"]
    global_params = {p.name: constant(p.default) for p in method.global_params}
    return MergePlan("task_arithmetic", tuple(models),
                     {"weight": {m: constant(w) for m, w in zip(models, weights, strict=True)}},
                     global_params)

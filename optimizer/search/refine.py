"""Gradient refinement of merge coefficients (AdaMerging-style): back-propagate through the merge itself.

The merged weights are written as `anchor + sum_i w_i(unit) * e_i` with `torch.func.functional_call`, so the
loss on the search split's gold answers (cross-entropy; prediction entropy for prompt-only tasks) is
differentiable in the per-unit coefficients `w`. Adam takes a few steps from a starting trial and the result,
clamped to the search bounds, is handed back as ordinary parameter values: the study enqueues it as a trial,
scores it with the evaluator and records it like any other, so a refinement that does not help is simply a
worse trial.

`e_i` is the method's own contribution of model i with weight 1 (its kernel called with a one-hot weight and
the starting trial's other parameters), which is the task vector itself for task arithmetic. Methods whose
merge is not linear in the weights (sign election, normalisation: TIES, DELLA, ...) are refused with a clear
reason rather than refined with a wrong gradient.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from optimizer.search.gold import GoldSet, item_scores, request_logprobs, task_means, weighted
from optimizer.space import SearchSpace


class NotRefinable(ValueError):
    """The study's method or space has no weights the refiner can learn (the reason is the message)."""


@dataclass
class RefineResult:
    """Refined parameter values, the search loss before and after (on every item), steps taken, seconds."""

    params: dict[str, float]
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "loss_start": self.losses[0], "loss_end": self.losses[-1],
                "seconds": round(self.seconds, 2)}


class MergeGraph:
    """The merge of a study's space as a differentiable function of its `weight` parameters.

    Args:
        space: the study's search space (its `weight/<model>/<unit>` parameters are learned).
        resident: anchor and task vectors.
        start: a full set of parameter values (a trial's params); every other parameter keeps its value.
        check_only: only check that the method is linear in its weights (on the first two tensors) and keep
            nothing: the cheap test run before a study starts.
    """

    def __init__(self, space: SearchSpace, resident: Any, start: Mapping[str, float], check_only: bool = False):
        self.space = space
        self.resident = resident
        self.learned = [p for p in space.params if p.param == "weight" and p.model is not None]
        if not self.learned:
            raise NotRefinable(f"method {space.method.name!r} searches no per-model weight; nothing to refine")
        if space.method.stochastic:
            raise NotRefinable(f"method {space.method.name!r} draws random masks per trial; a refined trial "
                               "would get other masks than the ones it was refined with")
        self.start = dict(start)
        self.index = {(p.model, p.unit): k for k, p in enumerate(self.learned)}
        plan = space.plan(self.start)
        self.models = space.models
        self.effective: dict[str, list[torch.Tensor]] = {}
        self.mix: dict[str, tuple[tuple[int, float], ...]] = {}
        for g in space.layout.groups:
            for name in g.tensors:
                self.mix[name] = g.mix
        if check_only:
            for name in resident.names[:2]:
                self._effective(name, plan)
            return
        for name in resident.names:
            self.effective[name] = self._effective(name, plan)

    def _effective(self, name: str, plan: Any) -> list[torch.Tensor]:
        """Each model's weight-1 contribution to tensor `name`, checked to add up to the plan's merge."""
        method, res = self.space.method, self.resident
        anchor, deltas = res.anchor[name], res.deltas[name]
        mp, gp = plan.resolve(name)
        weights = mp["weight"]
        out = []
        for i in range(len(deltas)):
            one = dict(mp, weight=[1.0 if j == i else 0.0 for j in range(len(deltas))])
            e = method.fn(anchor, deltas, one, gp, name=name).float() - anchor.float()
            out.append(deltas[i] if torch.equal(e, deltas[i].float()) else e)
        merged = method.fn(anchor, deltas, mp, gp, name=name).float()
        linear = anchor.float() + sum(w * e.float() for w, e in zip(weights, out, strict=True))
        scale = float(merged.abs().max()) + 1e-6
        if float((merged - linear).abs().max()) > 1e-4 * scale:
            raise NotRefinable(f"method {method.name!r} is not linear in its weights at tensor {name!r} "
                               "(sign election or normalisation); the refiner supports task_arithmetic-style "
                               "methods")
        return out

    def initial(self) -> torch.Tensor:
        return torch.tensor([self.start[p.name] for p in self.learned], dtype=torch.float32)

    def weights(self, coef: torch.Tensor, name: str) -> list[torch.Tensor]:
        """Per-model weight of tensor `name` (a unit's value, or the unit mix of gradient layouts)."""
        return [sum(c * coef[self.index[(m, u)]] for u, c in self.mix[name]) for m in self.models]

    def tensors(self, coef: torch.Tensor) -> dict[str, torch.Tensor]:
        res = self.resident
        out = {}
        for name in res.names:
            anchor = res.anchor[name]
            w = self.weights(coef, name)
            t = anchor.float() + sum(wi * e.float() for wi, e in zip(w, self.effective[name], strict=True))
            out[name] = t.to(anchor.dtype)
        return out

    def params(self, coef: torch.Tensor) -> dict[str, float]:
        """Full parameter values: the start with the learned weights replaced (clamped to their bounds)."""
        out = dict(self.start)
        for k, p in enumerate(self.learned):
            out[p.name] = float(min(max(float(coef[k]), p.low), p.high))
        return out


LOSSES = ("ce", "prob", "soft_acc", "entropy")


def search_loss(forward: Any, gold: GoldSet, loss: str = "ce", device: torch.device | None = None,
                temperature: float = 1.0) -> torch.Tensor:
    """Weighted mean over tasks of the per-item loss:

    - `ce`: cross-entropy of the gold answer (over the choices; the continuation's NLL);
    - `prob`: minus the gold answer's probability (its softmax share over the choices, or the continuation's
      geometric-mean token probability): bounded, so hopeless items do not dominate as in `ce`;
    - `soft_acc`: minus a differentiable accuracy, sigmoid(margin / temperature) of the gold choice over the
      best other one, or of the continuation's smallest per-token gap (what greedy exact match needs);
    - `entropy`: of the model's distribution over the choices (needs no gold).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: use one of {', '.join(LOSSES)}")
    scores = request_logprobs(forward, gold, device=device)
    if loss == "entropy":
        per_item = _choice_entropy(gold, scores.logprob)
    else:
        items = item_scores(gold, scores.logprob, scores.greedy, scores.gap, temperature)
        per_item = {"ce": items["nll"], "prob": -items["prob"], "soft_acc": -items["soft_acc"]}[loss]
    return weighted(gold, task_means(gold, per_item))


def _choice_entropy(gold: GoldSet, lp: torch.Tensor) -> torch.Tensor:
    groups: list[list[int]] = [[] for _ in gold.items]
    for r, i in enumerate(gold.item_of):
        groups[i].append(r)
    out = []
    for g in groups:
        x = lp[torch.tensor(g, device=lp.device)]
        p = torch.log_softmax(x, 0) if len(g) > 1 else torch.stack([x[0], torch.log1p(-x[0].exp().clamp(max=1 - 1e-6))])
        out.append(-(p.exp() * p).sum())
    return torch.stack(out)


def refine(space: SearchSpace, resident: Any, live: torch.nn.Module, start: Mapping[str, float], gold: GoldSet,
           *, steps: int = 30, lr: float = 0.05, batch_items: int = 0, loss: str = "ce", temperature: float = 1.0,
           seed: int = 0, on_step: Any = None) -> RefineResult:
    """Adam on the learned weights from `start`; returns the refined parameter values and the loss curve.

    Args:
        space, resident: the study's space and resident tensors.
        live: the live model (its module structure is used; its weights are not changed).
        start: the starting trial's parameter values.
        gold: the search split's gold answers (`optimizer.search.gold.evaluator_gold`).
        steps, lr: Adam steps and learning rate (in weight units).
        batch_items: items per step (0: all); drawn per step from `seed`.
        loss, temperature: see `search_loss`.
        on_step: optional callback(step, loss).
    """
    t0 = time.perf_counter()
    graph = MergeGraph(space, resident, start)
    coef = torch.nn.Parameter(graph.initial())
    opt = torch.optim.Adam([coef], lr=lr)
    rng = random.Random(seed)
    losses: list[float] = []
    dev = resident.device
    was_training = live.training
    live.eval()
    lows = torch.tensor([p.low for p in graph.learned])
    highs = torch.tensor([p.high for p in graph.learned])
    taken = 0
    try:
        for step in range(steps + 1):
            batch = gold
            if batch_items and batch_items < len(gold.items) and step < steps:
                batch = gold.subset(sorted(rng.sample(range(len(gold.items)), batch_items)))
            tensors = graph.tensors(coef)

            def forward(ids: torch.Tensor, mask: torch.Tensor, tensors: dict = tensors) -> torch.Tensor:
                return torch.func.functional_call(live, tensors, args=(), kwargs={"input_ids": ids,
                                                                                   "attention_mask": mask}).logits

            if step == steps:  # the final loss, on the whole set, without a step
                with torch.no_grad():
                    losses.append(float(search_loss(forward, gold, loss, dev, temperature)))
                break
            value = search_loss(forward, batch, loss, dev, temperature)
            if not math.isfinite(value.item()):
                break
            if step == 0 and batch is not gold:
                with torch.no_grad():
                    losses.append(float(search_loss(forward, gold, loss, dev, temperature)))
            elif step == 0:
                losses.append(value.item())
            opt.zero_grad()
            value.backward()
            opt.step()
            taken = step + 1
            with torch.no_grad():
                coef.copy_(torch.maximum(torch.minimum(coef, highs), lows))
            if on_step is not None:
                on_step(step, value.item())
    finally:
        live.train(was_training)
    return RefineResult(graph.params(coef.detach()), losses, taken, time.perf_counter() - t0)

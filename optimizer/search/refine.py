"""Gradient refinement of merge coefficients (AdaMerging-style): back-propagate through the merge itself.

The merged weights are `anchor + sum_i w_i(unit) * e_i`, so the loss on the search split's gold answers
(cross-entropy; prediction entropy for prompt-only tasks) is differentiable in the per-unit coefficients `w`:
each step writes the merge into the live model in place (as a trial does), back-propagates to the live
weights, and takes the chain rule by hand, dL/dw_i(unit) = sum over the unit's tensors of <dL/dtheta, e_i>
(chunked dot products). The extra memory is one gradient per merged weight in its own dtype (1x model
bytes) plus the activations of one micro-batch, not a float32 copy of the merged model with its autograd
graph. `MergeGraph.tensors` keeps the autograd formulation; tests check the two give the same gradient.
Adam takes a few steps from a starting trial and the result, clamped to the search bounds, is handed back as ordinary parameter values: the study enqueues it as a trial,
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
        """Each model's weight-1 contribution to tensor `name`, checked to add up to the plan's merge.

        The kernels write into a float32 buffer (no rounding to a bf16 storage dtype, which would fail the
        check for every bf16 model) and the comparisons run chunk by chunk, so the check holds one float32
        copy of the tensor at a time: a task vector that is its own contribution (task arithmetic) is kept
        by reference.
        """
        from optimizer.merge import sparsify as sp

        method, res = self.space.method, self.resident
        anchor, deltas = res.anchor[name], res.deltas[name]
        mp, gp = plan.resolve(name)
        weights = [float(w) for w in mp["weight"]]
        flat_a = anchor.reshape(-1)
        out: list[torch.Tensor] = []
        for i in range(len(deltas)):
            one = dict(mp, weight=[1.0 if j == i else 0.0 for j in range(len(deltas))])
            buf = torch.empty(anchor.shape, dtype=torch.float32, device=anchor.device)
            method.fn(anchor, deltas, one, gp, name=name, out=buf)
            flat_b, flat_d = buf.view(-1), deltas[i].reshape(-1)
            same = True
            for a, b in sp.chunks(flat_b.numel()):
                flat_b[a:b].sub_(flat_a[a:b])
                same = same and torch.equal(flat_b[a:b], flat_d[a:b].float())
            out.append(deltas[i] if same else buf)
        merged = torch.empty(anchor.shape, dtype=torch.float32, device=anchor.device)
        method.fn(anchor, deltas, mp, gp, name=name, out=merged)
        flat_m, flats = merged.view(-1), [e.reshape(-1) for e in out]
        worst = scale = 0.0
        for a, b in sp.chunks(flat_m.numel()):
            lin = flat_a[a:b].to(torch.float32, copy=True)  # never write the resident anchor
            for w, e in zip(weights, flats, strict=True):
                lin.add_(e[a:b].float(), alpha=w)
            scale = max(scale, float(flat_m[a:b].abs().max()))
            worst = max(worst, float((flat_m[a:b] - lin).abs().max()))
        if worst > 1e-4 * (scale + 1e-6):
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

    def write(self, coef: torch.Tensor, targets: Mapping[str, torch.Tensor]) -> None:
        """Write the merge at `coef` into `targets` (the live weights, by tensor name) in place."""
        from optimizer.merge.tensor_ops import weighted_sum

        res = self.resident
        with torch.no_grad():
            for name in res.names:
                w = [float(x) for x in self.weights(coef.detach(), name)]
                weighted_sum(res.anchor[name], 1.0, self.effective[name], w, targets[name].data)

    def coef_grad(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """dL/dcoef from the loss's gradients at the merged weights (by tensor name): the chain rule through
        `anchor + sum_i w_i e_i`, with each w_i a mix of unit coefficients."""
        from optimizer.merge import sparsify as sp

        out = torch.zeros(len(self.learned), dtype=torch.float64)
        for name, g in grads.items():
            flat_g = g.reshape(-1)
            for m, e in zip(self.models, self.effective[name], strict=True):
                flat_e = e.reshape(-1)
                dot = 0.0
                for start, stop in sp.chunks(flat_g.numel()):
                    dot += float(torch.dot(flat_g[start:stop].float(), flat_e[start:stop].float()))
                for u, c in self.mix[name]:
                    out[self.index[(m, u)]] += c * dot
        return out.float()

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
    return weighted(gold, task_means(gold, item_losses(forward, gold, loss, device, temperature)))


def item_losses(forward: Any, gold: GoldSet, loss: str = "ce", device: torch.device | None = None,
                temperature: float = 1.0) -> torch.Tensor:
    """The per-item loss of `search_loss`, one value per item of `gold`, in its order."""
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: use one of {', '.join(LOSSES)}")
    scores = request_logprobs(forward, gold, device=device)
    if loss == "entropy":
        return _choice_entropy(gold, scores.logprob)
    items = item_scores(gold, scores.logprob, scores.greedy, scores.gap, temperature)
    return {"ce": items["nll"], "prob": -items["prob"], "soft_acc": -items["soft_acc"]}[loss]


def backward_loss(forward: Any, gold: GoldSet, loss: str, device: torch.device | None, temperature: float,
                  micro_items: int = 0) -> float:
    """`search_loss` on `gold`, back-propagated `micro_items` items at a time (0: all at once).

    The loss is a weighted mean of task means, i.e. a sum over items with weight w_task / (n_task * sum w):
    each micro-batch back-propagates its share and the gradients add up to the whole batch's, while only one
    micro-batch's activations are held. Returns the loss.
    """
    n = len(gold.items)
    if not micro_items or micro_items >= n:
        value = search_loss(forward, gold, loss, device, temperature)
        value.backward()
        return float(value)
    counts: dict[str, int] = {}
    for it in gold.items:
        counts[it.task] = counts.get(it.task, 0) + 1
    total_w = sum(gold.weights.get(t, 1.0) for t in counts)
    scale = [gold.weights.get(it.task, 1.0) / (counts[it.task] * total_w) for it in gold.items]
    value = 0.0
    for start in range(0, n, micro_items):
        part = list(range(start, min(start + micro_items, n)))
        per_item = item_losses(forward, gold.subset(part), loss, device, temperature)
        share = (per_item * torch.tensor([scale[k] for k in part], device=per_item.device)).sum()
        share.backward()
        value += float(share)
    return value


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
           seed: int = 0, micro_items: int = 0, on_step: Any = None) -> RefineResult:
    """Adam on the learned weights from `start`; returns the refined parameter values and the loss curve.

    Args:
        space, resident: the study's space and resident tensors.
        live: the live model: each step writes the merge into it in place (the next trial overwrites it).
        start: the starting trial's parameter values.
        gold: the search split's gold answers (`optimizer.search.gold.evaluator_gold`).
        steps, lr: Adam steps and learning rate (in weight units).
        batch_items: items per step (0: all); drawn per step from `seed`.
        loss, temperature: see `search_loss`.
        micro_items: items per forward/backward pass (0: the whole batch); the gradient is the same, the
            activations held are a micro-batch's.
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
    named = dict(live.named_parameters(remove_duplicate=False))
    targets = {n: named[n] for n in resident.names}
    learned: dict[int, str] = {}  # one name per live parameter (tied weights share one gradient)
    for n in resident.names:
        learned[id(targets[n])] = n  # the last name written is the one the weight holds
    flags = {id(p): p.requires_grad for p in named.values()}

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return live(input_ids=ids, attention_mask=mask).logits

    try:
        for p in named.values():
            p.requires_grad_(id(p) in learned)
            p.grad = None
        for step in range(steps + 1):
            batch = gold
            if batch_items and batch_items < len(gold.items) and step < steps:
                batch = gold.subset(sorted(rng.sample(range(len(gold.items)), batch_items)))
            graph.write(coef, targets)
            if step == steps:  # the final loss, on the whole set, without a step
                with torch.no_grad():
                    losses.append(float(search_loss(forward, gold, loss, dev, temperature)))
                break
            if step == 0 and batch is not gold:
                with torch.no_grad():
                    losses.append(float(search_loss(forward, gold, loss, dev, temperature)))
            value = backward_loss(forward, batch, loss, dev, temperature, micro_items)
            if not math.isfinite(value):
                break
            if step == 0 and batch is gold:
                losses.append(value)
            grads = {n: targets[n].grad for n in learned.values() if targets[n].grad is not None}
            opt.zero_grad()
            coef.grad = graph.coef_grad(grads)
            for n in learned.values():
                targets[n].grad = None
            opt.step()
            taken = step + 1
            with torch.no_grad():
                coef.copy_(torch.maximum(torch.minimum(coef, highs), lows))
            if on_step is not None:
                on_step(step, value)
    finally:
        for p in named.values():
            p.grad = None
            p.requires_grad_(flags[id(p)])
        live.train(was_training)
    return RefineResult(graph.params(coef.detach()), losses, taken, time.perf_counter() - t0)

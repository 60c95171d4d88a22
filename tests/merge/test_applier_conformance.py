"""Both appliers against the `PlanApplier` protocol (optimizer/merge/apply.py): the dense `Applier` and the
frankenMoE `MoeApplier` (optimizer/moe/search.py), built the way a run builds them (`session.prepare` +
`session.load`), on CPU and, in a `gpu` test, on CUDA.

The contract: `apply(plan, seed=, trial=)` overwrites the live model's merged tensors in place with the
plan's result (nothing accumulates from earlier trials), the same (plan, seed, trial) gives the same bits,
and random masks follow (seed, trial). What "the plan's result" is differs per applier and is stated by
each case's `expected`: the dense model holds base + sum_i w_i delta_i; MoE slot i holds base + w_i delta_i.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from optimizer.config import Config
from optimizer.merge.apply import Applier, PlanApplier
from optimizer.moe.layout import expert_views, is_mlp
from optimizer.moe.search import MoeApplier
from optimizer.session import load, prepare
from tests.conftest import DEVICES

MODELS = ("a", "b")
PROMPTS = {"a": ["12+35=47", "58+21=79", "33+44=77"], "b": ["rev:abc>cba", "rev:hello>olleh", "rev:xyz>zyx"]}


def session(tiny_models, tmp_path, kind: str, device: str, method: str = "task_arithmetic"):
    cfg = OmegaConf.structured(Config)
    cfg.models.base = str(tiny_models["base"])
    cfg.models.models = {m: str(tiny_models[m]) for m in MODELS}
    cfg.evaluator = {"name": "lm_toy"}
    cfg.merge.method = method
    cfg.run_root, cfg.device = str(tmp_path / "runs"), device
    if kind == "moe":
        cfg.moe = {"base_model": str(tiny_models["base"]), "gate_mode": "hidden", "experts_per_token": 1,
                   "experts": [{"source_model": str(tiny_models[m]), "name": m, "positive_prompts": PROMPTS[m]}
                               for m in MODELS]}
    s = prepare(cfg)
    load(s)
    return s


def per_model(s, weights: dict[str, float], **other) -> dict[str, float]:
    """Trial parameters: weight w_m for every unit of model m; other declared parameters as given."""
    values = s.space.baseline(other)
    for p in s.space.params:
        if p.param == "weight":
            values[p.name] = weights[p.model]
    return values


def expected(s, kind: str, weights: dict[str, float]) -> dict[tuple[int | None, str], torch.Tensor]:
    """(slot or None, dense tensor name) -> what the live model must hold after a task-arithmetic plan."""
    res = s.resident
    w = [weights[m] for m in res.models]
    if kind == "dense":
        return {(None, n): res.anchor[n] + sum(wi * d for wi, d in zip(w, res.deltas[n], strict=True))
                for n in res.names}
    return {(i, n): res.anchor[n] + w[i] * res.deltas[n][i] for n in res.names if is_mlp(n)
            for i in range(len(w))}


def held(s, key: tuple[int | None, str]) -> torch.Tensor:
    slot, name = key
    if slot is None:
        return dict(s.live.named_parameters())[name]
    return expert_views(s.live, slot)[name]


def snapshot(s) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in s.live.named_parameters()}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


KINDS = ["dense", "moe"]
APPLIER = {"dense": Applier, "moe": MoeApplier}


both = [pytest.mark.parametrize("device", DEVICES), pytest.mark.parametrize("kind", KINDS)]


def on_every_applier(fn):
    for mark in both:
        fn = mark(fn)
    return fn


@on_every_applier
def test_protocol_and_construction(tiny_models, tmp_path, kind, device):
    s = session(tiny_models, tmp_path, kind, device)
    assert isinstance(s.applier, PlanApplier) and type(s.applier) is APPLIER[kind]
    assert all(p.device.type == device for p in s.live.parameters())
    assert all(t.device.type == device for t in s.resident.anchor.values())


@on_every_applier
def test_writes_the_plan_in_place(tiny_models, tmp_path, kind, device):
    s = session(tiny_models, tmp_path, kind, device)
    ptrs = {n: p.data_ptr() for n, p in s.live.named_parameters()}
    weights = {"a": 0.7, "b": 0.2}
    s.applier.apply(s.space.plan(per_model(s, weights)))
    assert ptrs == {n: p.data_ptr() for n, p in s.live.named_parameters()}  # no reallocation, no copy
    for key, want in expected(s, kind, weights).items():
        torch.testing.assert_close(held(s, key), want, rtol=1e-6, atol=1e-6, msg=str(key))


@on_every_applier
def test_nothing_accumulates_across_trials(tiny_models, tmp_path, kind, device):
    """Trial B after trial A gives exactly what trial B gives on a fresh model."""
    s = session(tiny_models, tmp_path, kind, device)
    fresh = session(tiny_models, tmp_path / "fresh", kind, device)
    a, b = per_model(s, {"a": 1.4, "b": 0.0}), per_model(s, {"a": 0.3, "b": 0.9})
    s.applier.apply(s.space.plan(a))
    s.applier.apply(s.space.plan(b))
    fresh.applier.apply(fresh.space.plan(b))
    assert same_bits(snapshot(s), snapshot(fresh))
    s.applier.apply(s.space.plan(per_model(s, {"a": 0.0, "b": 0.0})))  # all zero: the base itself
    for (slot, name), _ in expected(s, kind, {"a": 0.0, "b": 0.0}).items():
        assert torch.equal(held(s, (slot, name)), s.resident.anchor[name]), name


@on_every_applier
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_random_masks_follow_seed_and_trial(tiny_models, tmp_path, kind, device, method):
    s = session(tiny_models, tmp_path, kind, device, method=method)
    plan = s.space.plan(per_model(s, {"a": 1.0, "b": 1.0}, density=0.5))
    s.applier.apply(plan, seed=3, trial=5)
    first = snapshot(s)
    s.applier.apply(plan, seed=3, trial=6)
    other_trial = snapshot(s)
    s.applier.apply(plan, seed=4, trial=5)
    other_seed = snapshot(s)
    s.applier.apply(plan, seed=3, trial=5)
    assert same_bits(snapshot(s), first)  # a trial re-materialises bit for bit (held-out, export)
    assert not same_bits(other_trial, first) and not same_bits(other_seed, first)

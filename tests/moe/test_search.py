"""Search building blocks: live dimensions, per-trial in-place writes through MoeApplier, router re-derivation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from optimizer import UserError
from optimizer.checkpoint import Checkpoint
from optimizer.models import Resident
from optimizer.moe.config import load_moe_config
from optimizer.moe.layout import expert_views, is_mlp
from optimizer.moe.search import MoeApplier, build_live_moe, live_tensor_names
from optimizer.moe.sources import load_tokenizer
from optimizer.plan import MergePlan, constant
from tests.moe.conftest import recipe

EXPERTS = ("add", "rev", "up")
DOWN0 = "model.layers.0.mlp.down_proj.weight"  # changes what the layer-1 router sees
Q0 = "model.layers.0.self_attn.q_proj.weight"


def resident(zoo) -> tuple[Checkpoint, Resident]:
    base = Checkpoint(str(zoo["base"]))
    anchor = {n: base.tensor(n) for n in base.infos()}
    experts = [Checkpoint(str(zoo[e])) for e in EXPERTS]
    deltas = {n: [e.tensor(n) - anchor[n] for e in experts] for n in anchor}
    return base, Resident(list(anchor), anchor, deltas, EXPERTS)


def plan(method: str, weights: dict[str, float], **globals_) -> MergePlan:
    """Weight w on DOWN0 and Q0 for each named expert, 1.0 elsewhere."""
    rules = {m: ((DOWN0, w), (Q0, w), (None, 1.0)) for m, w in weights.items()}
    return MergePlan(method, EXPERTS, {"weight": rules}, {k: constant(v) for k, v in globals_.items()})


def live_moe(zoo, **extra):
    cfg = load_moe_config(recipe(zoo, **extra))
    base, res = resident(zoo)
    tok = load_tokenizer(base)
    model = build_live_moe(cfg, AutoConfig.from_pretrained(base.path), res.anchor, res.deltas, tok,
                           dtype=torch.float32, device="cpu")
    return cfg, res, model, MoeApplier(model, res, cfg, tok)


def test_live_tensor_names_drop_dead_dimensions(zoo) -> None:
    names = list(Checkpoint(str(zoo["base"])).infos())
    live = live_tensor_names(load_moe_config(recipe(zoo)), names)
    assert live == [n for n in names if is_mlp(n)] and len(live) == 6
    assert live_tensor_names(load_moe_config(recipe(zoo, shared="merge")), names) == names


def test_trial_writes_slots_in_place_and_rederives_router(zoo) -> None:
    cfg, res, model, applier = live_moe(zoo, calibrate={"steps": 20, "per_trial": "full"})
    router1 = model.model.layers[1].mlp.gate.weight.clone()
    ptrs = [p.data_ptr() for p in model.parameters()]
    q0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    applier.apply(plan("task_arithmetic", {"add": 1.0, "rev": 0.5, "up": 0.0}))
    assert applier.router_stats["tokens"] > 0 and ptrs == [p.data_ptr() for p in model.parameters()]
    a, d = res.anchor[DOWN0], res.deltas[DOWN0]
    torch.testing.assert_close(expert_views(model, 1)[DOWN0], a + 0.5 * d[1])
    assert torch.equal(expert_views(model, 2)[DOWN0], a)
    torch.testing.assert_close(expert_views(model, 0)[DOWN0], a + d[0])
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q0)  # shared=base: untouched
    assert not torch.equal(model.model.layers[1].mlp.gate.weight, router1)


def test_sparsifying_methods_are_reproducible_per_trial(zoo) -> None:
    _, res, model, applier = live_moe(zoo)
    p = plan("dare_linear", {"add": 1.0, "rev": 1.0, "up": 1.0}, density=0.5)
    applier.apply(p, seed=0, trial=3)
    first = expert_views(model, 1)[DOWN0].clone()
    assert (first != res.anchor[DOWN0]).float().mean() < 0.8  # about half the delta was dropped
    applier.apply(p, seed=0, trial=4)
    assert not torch.equal(expert_views(model, 1)[DOWN0], first)
    applier.apply(p, seed=0, trial=3)
    assert torch.equal(expert_views(model, 1)[DOWN0], first)
    with pytest.raises(UserError, match="does not apply to a single task vector"):
        applier.apply(MergePlan("model_stock", EXPERTS))


def test_shared_merge_is_a_searched_merge_of_the_experts(zoo) -> None:
    _, res, model, applier = live_moe(zoo, shared="merge")
    q = model.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(q, res.anchor[Q0] + sum(res.deltas[Q0]) / 3)
    applier.apply(plan("task_arithmetic", {"add": 0.0, "rev": 0.0, "up": 0.0}))
    assert torch.equal(q, res.anchor[Q0])
    applier.apply(plan("task_arithmetic", {"add": 0.0, "rev": 0.5, "up": 0.0}))
    torch.testing.assert_close(q, res.anchor[Q0] + 0.5 * res.deltas[Q0][1])


def routers_of(model) -> torch.Tensor:
    return torch.stack([layer.mlp.gate.weight.detach().clone() for layer in model.model.layers])


A = {"add": 1.0, "rev": 0.5, "up": 0.0}
B = {"add": 0.2, "rev": 1.3, "up": 0.7}


def test_reuse_keeps_the_load_time_router(zoo) -> None:
    _, _, model, applier = live_moe(zoo, calibrate={"steps": 20})  # per_trial: reuse (the default)
    loaded = routers_of(model)
    applier.apply(plan("task_arithmetic", A))
    assert torch.equal(routers_of(model), loaded) and torch.equal(applier.reference_router, loaded)


@pytest.mark.parametrize("per_trial", ["reuse", "refit", "full"])
def test_a_trial_rematerialises_bit_identically_in_any_order(zoo, per_trial) -> None:
    _, _, model, applier = live_moe(zoo, calibrate={"steps": 20, "per_trial": per_trial, "refit_steps": 10})
    applier.apply(plan("task_arithmetic", A))
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    applier.apply(plan("task_arithmetic", B))
    assert not torch.equal(expert_views(model, 1)[DOWN0], first["model.layers.0.mlp.experts.down_proj"][1])
    applier.apply(plan("task_arithmetic", A))
    for n, p in model.named_parameters():
        assert torch.equal(p, first[n]), n
    if per_trial == "refit":
        assert not torch.equal(routers_of(model), applier.reference_router)  # refit from the load-time router


def test_only_changed_tensors_are_rewritten_and_router_rederived_when_needed(zoo, monkeypatch) -> None:
    import dataclasses

    from optimizer.merge import registry
    from optimizer.moe import search

    _, _, model, applier = live_moe(zoo, shared="merge", calibrate={"steps": 20, "per_trial": "refit"})
    writes, fits = [], []
    method = registry.METHODS["task_arithmetic"]

    def counting(*a, **k):
        writes.append(k["name"])
        return method.fn(*a, **k)

    monkeypatch.setitem(registry.METHODS, "task_arithmetic", dataclasses.replace(method, fn=counting))
    real = search.calibrate_router
    monkeypatch.setattr(search, "calibrate_router", lambda *a, **k: fits.append(1) or real(*a, **k))
    applier.apply(plan("task_arithmetic", A))
    n_first = len(writes)
    assert n_first > 0 and fits == [1]
    writes.clear()
    applier.apply(plan("task_arithmetic", A))  # nothing changed: no write, no refit
    assert writes == [] and fits == [1]
    rules = {m: ((DOWN0, w), (None, 1.0)) for m, w in A.items()}  # Q0 (shared) back to 1.0 only
    shared_only = MergePlan("task_arithmetic", EXPERTS, {"weight": rules}, {})
    applier.apply(shared_only)
    assert writes == [Q0] and fits == [1, 1]  # the router reads the shared tensors' output: refit

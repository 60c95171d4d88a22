"""In-place application of plans to a live model, checked against hand computation."""

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from optimizer.config import MergeConfig, ModelsConfig
from optimizer.merge.apply import Applier
from optimizer.merge.registry import METHODS
from optimizer.models import ModelSet
from optimizer.space import SearchSpace, derive_layout


def setup(tiny_models):
    cfg = OmegaConf.merge(OmegaConf.structured(ModelsConfig),
                          {"base": str(tiny_models["base"]), "models": {"a": str(tiny_models["a"]),
                                                                        "b": str(tiny_models["b"])}})
    ms = ModelSet(cfg)
    live = ms.load_live(torch.device("cpu"))
    return ms, live, Applier(live, ms.load_resident(torch.device("cpu")))


def test_layerwise_task_arithmetic_matches_hand_computation(tiny_models):
    ms, live, applier = setup(tiny_models)
    space = SearchSpace(METHODS["task_arithmetic"], ms.names, derive_layout(ms.tensor_names, "layer"),
                        OmegaConf.structured(MergeConfig))
    values = {p.name: 0.1 * (i % 7) for i, p in enumerate(space.params)}
    applier.apply(space.plan(values))
    sd = {k: load_file(str(tiny_models[k] / "model.safetensors")) for k in ("base", "a", "b")}
    params = dict(live.named_parameters())
    for name in ["model.layers.1.mlp.gate_proj.weight", "model.embed_tokens.weight", "lm_head.weight"]:
        unit = "layer.1" if "layers" in name else name.removeprefix("model.").removesuffix(".weight")
        wa, wb = values[f"weight/a/{unit}"], values[f"weight/b/{unit}"]
        b = sd["base"][name]
        expected = b + wa * (sd["a"][name] - b) + wb * (sd["b"][name] - b)
        assert torch.allclose(params[name], expected, atol=1e-6), name


def test_apply_single_restores_each_model_exactly(tiny_models):
    ms, live, applier = setup(tiny_models)
    for idx, key in [(0, "a"), (1, "b"), (None, "base")]:
        applier.apply_single(idx)
        sd = load_file(str(tiny_models[key] / "model.safetensors"))
        for name, p in live.named_parameters():
            assert torch.allclose(p, sd[name], atol=1e-6), (key, name)


def test_apply_is_in_place(tiny_models):
    ms, live, applier = setup(tiny_models)
    ptrs = {n: p.data_ptr() for n, p in live.named_parameters()}
    applier.apply_single(0)
    assert ptrs == {n: p.data_ptr() for n, p in live.named_parameters()}


def test_stochastic_trial_is_reproducible(tiny_models):
    ms, live, applier = setup(tiny_models)
    space = SearchSpace(METHODS["dare_ties"], ms.names, derive_layout(ms.tensor_names, "layer"),
                        OmegaConf.structured(MergeConfig))
    plan = space.plan(space.baseline({}))
    applier.apply(plan, seed=3, trial=5)
    first = {n: p.detach().clone() for n, p in live.named_parameters()}
    applier.apply(plan, seed=3, trial=6)
    assert any(not torch.equal(first[n], p) for n, p in live.named_parameters())
    applier.apply(plan, seed=3, trial=5)
    assert all(torch.equal(first[n], p) for n, p in live.named_parameters())

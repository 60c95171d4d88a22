"""Search space derivation: counts for real architectures (config only, meta device), names, bounds."""

import optuna
import pytest
import torch
from omegaconf import OmegaConf
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from optimizer import UserError
from optimizer.config import MergeConfig
from optimizer.merge.registry import METHODS
from optimizer.space import SearchSpace, derive_layout


def names_of(model_cls, config):
    with torch.device("meta"):
        model = model_cls(config)
    return [n for n, _ in model.named_parameters()]  # tied weights appear once, as in a checkpoint


@pytest.fixture(scope="module")
def mistral7b():
    return names_of(MistralForCausalLM, MistralConfig())  # defaults are Mistral-7B-v0.1's shape


@pytest.mark.parametrize("granularity,count", [("all", 291), ("layer", 35), ("parameter", 12),
                                               ("block:8", 4 + 3), ("gradient:5", 5)])
def test_mistral7b_counts(mistral7b, granularity, count):
    assert len(derive_layout(mistral7b, granularity).units) == count


def test_qwen2_with_biases_and_tied_head():
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)
    names = names_of(Qwen2ForCausalLM, cfg)
    assert "lm_head.weight" not in names
    assert len(derive_layout(names, "all").units) == len(names) == 3 * 12 + 2
    assert len(derive_layout(names, "layer").units) == 3 + 2
    units = derive_layout(names, "parameter").units
    assert "self_attn.q_proj.bias" in units and "self_attn.q_proj" in units and len(units) == 12 + 2


def test_parameter_filters_do_not_capture_bias_tensors():
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    layout = derive_layout(names_of(Qwen2ForCausalLM, cfg), "parameter")
    for g in layout.groups:  # first matching filter must be the tensor's own group, for every tensor
        for t in g.tensors:
            first = next(h for h in layout.groups if h.filter in t)
            assert first is g, (t, g.filter, first.filter)


def test_layer_units_are_readable_and_ordered(mistral7b):
    units = derive_layout(mistral7b, "layer").units
    assert units[0] == "embed_tokens"
    assert units[1:33] == tuple(f"layer.{i}" for i in range(32))
    assert set(units[33:]) == {"norm", "lm_head"}
    assert derive_layout(list(reversed(mistral7b)), "layer").units == units  # input order does not matter


def test_layer_filter_does_not_match_longer_index(mistral7b):
    layout = derive_layout(mistral7b, "layer")
    g1 = next(g for g in layout.groups if g.filter == "model.layers.1.")
    assert all(".layers.1." in t for t in g1.tensors) and len(g1.tensors) == 9


def test_gradient_interpolates_between_anchors(mistral7b):
    layout = derive_layout(mistral7b, "gradient:2")
    first = next(g for g in layout.groups if g.filter == "model.layers.0.")
    last = next(g for g in layout.groups if g.filter == "model.layers.31.")
    mid = next(g for g in layout.groups if g.filter == "model.layers.10.")
    assert first.mix == ((0, 1.0),) and last.mix == ((1, 1.0),)
    assert mid.mix[0][1] == pytest.approx(1 - 10 / 31)
    by_filter = {g.filter: g.mix for g in layout.groups}  # mergekit: non-layer tensors take the first value
    assert by_filter["model.embed_tokens.weight"] == ((0, 1.0),)
    assert by_filter["model.norm.weight"] == ((0, 1.0),) and by_filter["lm_head.weight"] == ((0, 1.0),)


@pytest.mark.parametrize("bad", ["rows", "block:x", "gradient:0", "layer:3"])
def test_unknown_granularity(mistral7b, bad):
    with pytest.raises(UserError, match="mode.granularity"):
        derive_layout(mistral7b, bad)


def merge_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(MergeConfig), kw)


def test_param_names_and_plan(mistral7b):
    space = SearchSpace(METHODS["ties"], ["ja", "math"], derive_layout(mistral7b, "parameter"),
                        merge_cfg(method="ties"))
    names = [p.name for p in space.params]
    assert names[0] == "weight/ja/embed_tokens" and "density/math/mlp.down_proj" in names
    assert len(names) == 2 * 2 * 12
    plan = space.plan(space.baseline({"weight": 1.0}))
    mp, gp = plan.resolve("model.layers.3.mlp.down_proj.weight")
    assert mp["weight"] == [1.0, 1.0] and mp["density"] == [0.5, 0.5] and gp["normalize"] == 1.0


def test_plan_maps_unit_values_to_tensors(mistral7b):
    space = SearchSpace(METHODS["task_arithmetic"], ["a"], derive_layout(mistral7b, "layer"), merge_cfg())
    values = {p.name: i / 100 for i, p in enumerate(space.params)}
    plan = space.plan(values)
    assert plan.resolve("model.layers.0.self_attn.q_proj.weight")[0]["weight"] == [values["weight/a/layer.0"]]
    assert plan.resolve("model.layers.12.mlp.up_proj.weight")[0]["weight"] == [values["weight/a/layer.12"]]
    assert plan.resolve("lm_head.weight")[0]["weight"] == [values["weight/a/lm_head"]]


def test_suggest_uses_bounds(mistral7b):
    space = SearchSpace(METHODS["task_arithmetic"], ["a"], derive_layout(mistral7b, "parameter"),
                        merge_cfg(bounds={"weight": [0.2, 0.4]}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    values = space.suggest(trial)
    assert all(0.2 <= v <= 0.4 for v in values.values()) and len(values) == 12


@pytest.mark.parametrize("kw,match", [
    ({"bounds": {"weight": [1.0, 0.0]}}, "low is greater than high"),
    ({"bounds": {"weight": [0.0, 99.0]}}, "valid range"),
    ({"search": ["weight", "gamma"]}, "does not declare"),
    ({"params": {"weight": 0.5}}, "also searched"),
    ({"search": [], "params": {"weight": {"zz": 1.0}}}, "no model named"),
])
def test_bad_merge_config(mistral7b, kw, match):
    with pytest.raises(UserError, match=match):
        SearchSpace(METHODS["task_arithmetic"], ["a"], derive_layout(mistral7b, "layer"), merge_cfg(**kw))


def test_pinned_param_reaches_plan(mistral7b):
    space = SearchSpace(METHODS["ties"], ["a", "b"], derive_layout(mistral7b, "layer"),
                        merge_cfg(search=["weight"], params={"density": {"a": 0.3, "b": 0.7}}))
    assert all(p.param == "weight" for p in space.params)
    mp, _ = space.plan(space.baseline({})).resolve("model.layers.0.mlp.up_proj.weight")
    assert mp["density"] == [0.3, 0.7]

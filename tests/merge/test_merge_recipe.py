"""mergekit-style recipes: both forms, gradients, filters, defaults, round trip."""

from __future__ import annotations

import pytest
import yaml

from optimizer.merge.recipe import Recipe, evaluate, layer_fraction

SLERP = """
slices:
  - sources:
      - model: OpenPipe/mistral-ft-optimized-1218
        layer_range: [0, 32]
      - model: mlabonne/NeuralHermes-2.5-Mistral-7B
        layer_range: [0, 32]
merge_method: slerp
base_model: OpenPipe/mistral-ft-optimized-1218
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""

TIES = """
models:
  - model: mistralai/Mistral-7B-v0.1
  - model: ja-chat
    parameters:
      density: 0.5
      weight: [0.2, 0.8]
  - model: math
    parameters:
      density: [{filter: mlp, value: 0.7}, {value: 0.3}]
      weight: 0.5
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: true
  density: 0.9
dtype: float16
tokenizer_source: base
"""

Q = "model.layers.{}.self_attn.q_proj.weight"
UP = "model.layers.{}.mlp.up_proj.weight"


def test_slices_form_gradients_and_filters():
    r = Recipe.from_dict(yaml.safe_load(SLERP))
    assert r.models == ("mlabonne/NeuralHermes-2.5-Mistral-7B",) and r.layer_range == (0, 32)
    assert r.value(None, "t", Q.format(0), 0, 32) == 0.0
    assert r.value(None, "t", Q.format(31), 31, 32) == 1.0
    # layer 8 of 32: t = 8/31, scaled = 32/31 -> between anchors 1 (0.5) and 2 (0.3)
    frac = 32 / 31 - 1
    assert r.value(None, "t", Q.format(8), 8, 32) == pytest.approx(0.5 * (1 - frac) + 0.3 * frac)
    assert r.value(None, "t", UP.format(0), 0, 32) == 1.0
    assert r.value(None, "t", "model.layers.3.input_layernorm.weight", 3, 32) == 0.5
    assert r.dtype == "bfloat16"


def test_non_layer_tensors_follow_mergekit_t():
    """mergekit plans embeddings, final norm and lm_head all at t=0: the first gradient value."""
    r = Recipe.from_dict({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
                          "parameters": {"t": [0.1, 0.9]}})
    assert r.value(None, "t", "model.embed_tokens.weight", None, 4) == pytest.approx(0.1)
    assert r.value(None, "t", "model.norm.weight", None, 4) == pytest.approx(0.1)
    assert r.value(None, "t", "lm_head.weight", None, 4) == pytest.approx(0.1)
    assert layer_fraction("x", 0, 1) == 1.0  # one layer: mergekit uses t = 1


def test_models_form_precedence_and_defaults():
    r = Recipe.from_dict(yaml.safe_load(TIES))
    assert r.models == ("ja-chat", "math") and r.base_model == "mistralai/Mistral-7B-v0.1" and r.base_listed
    assert r.value("ja-chat", "density", UP.format(2), 2, 4) == 0.5  # model level beats top level
    assert r.value("math", "density", UP.format(2), 2, 4) == 0.7  # first matching filter
    assert r.value("math", "density", Q.format(2), 2, 4) == 0.3
    assert r.value("ja-chat", "weight", Q.format(3), 3, 4) == pytest.approx(0.8)
    assert r.value(None, "normalize", Q.format(0), 0, 4) == 1.0  # booleans as floats
    assert r.value("math", "gamma", Q.format(0), 0, 4) == 0.01  # mergekit's default
    assert r.extra["tokenizer_source"] == "base"


def test_missing_required_parameter_and_unknown_model():
    r = Recipe.from_dict({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}]})
    with pytest.raises(ValueError, match="no 'weight' for model 'x'"):
        r.value("x", "weight", Q.format(0), 0, 2)
    assert r.value("x", "weight", Q.format(0), 0, 2, default=1.0) == 1.0
    assert r.value(None, "normalize", Q.format(0), 0, 2) == 1.0  # the ties preset's default
    with pytest.raises(ValueError, match="no model 'y'"):
        r.value("y", "weight", Q.format(0), 0, 2)


def test_conditional_without_match_falls_through_to_top_level():
    r = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": "b", "parameters": {"weight": 0.25},
                          "models": [{"model": "x", "parameters": {"weight": [{"filter": "mlp", "value": 2}]}}]})
    assert r.value("x", "weight", UP.format(0), 0, 2) == 2.0
    assert r.value("x", "weight", Q.format(0), 0, 2) == 0.25


def test_string_lists_pick_an_anchor():
    assert evaluate(("a", "b", "c"), "t", 0.6) == "b"


@pytest.mark.parametrize("text", [SLERP, TIES])
def test_round_trip(text, tmp_path):
    r = Recipe.from_dict(yaml.safe_load(text))
    r.dump(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml") == r
    assert "[0, 0.5, 0.3, 0.7, 1]" in r.dump() or "[0.2, 0.8]" in r.dump()  # gradients in flow style


@pytest.mark.parametrize(("change", "message"), [
    ({"merge_method": "nope"}, "known"),
    ({"modules": {"a": {}}}, "modules"),
    ({"slices": [{"sources": []}, {"sources": []}]}, "2 slices"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 8]}, {"model": "b", "layer_range": [8, 16]}]}]},
     "one layer_range"),
    ({"models": [{"model": "x"}]}, "exactly one of"),
])
def test_unsupported_recipes_are_refused_clearly(change, message):
    d = yaml.safe_load(SLERP) | change
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(d)


def test_partial_range_is_refused_at_query_time():
    r = Recipe.from_dict(yaml.safe_load(SLERP))
    with pytest.raises(ValueError, match="full layer ranges"):
        r.value(None, "t", Q.format(0), 0, 24)

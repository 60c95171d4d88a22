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

FRANKEN = """
slices:
  - sources:
      - model: OpenPipe/mistral-ft-optimized-1218
        layer_range: [0, 32]
  - sources:
      - model: mlabonne/NeuralHermes-2.5-Mistral-7B
        layer_range: [24, 32]
        parameters:
          scale: [{filter: o_proj, value: 0.5}, {value: 1.0}]
merge_method: passthrough
dtype: bfloat16
"""

Q = "model.layers.{}.self_attn.q_proj.weight"
UP = "model.layers.{}.mlp.up_proj.weight"
A, B = "OpenPipe/mistral-ft-optimized-1218", "mlabonne/NeuralHermes-2.5-Mistral-7B"


def test_slices_form_gradients_and_filters():
    r = Recipe.from_dict(yaml.safe_load(SLERP))
    assert r.form == "slices" and r.inputs(0) == (B,) and r.slices[0].length == 32
    assert r.value(0, None, "t", Q.format(0), layer_fraction(0, 32)) == 0.0
    assert r.value(0, None, "t", Q.format(31), layer_fraction(31, 32)) == 1.0
    # layer 8 of 32: t = 8/31, scaled = 32/31 -> between anchors 1 (0.5) and 2 (0.3)
    frac = 32 / 31 - 1
    assert r.value(0, None, "t", Q.format(8), layer_fraction(8, 32)) == pytest.approx(0.5 * (1 - frac) + 0.3 * frac)
    assert r.value(0, None, "t", UP.format(0), 0.0) == 1.0
    assert r.value(0, None, "t", "model.layers.3.input_layernorm.weight", 0.1) == 0.5
    assert r.dtype == "bfloat16"


def test_layer_fraction_is_per_slice_and_zero_outside_layers():
    """mergekit plans embeddings, final norm and lm_head at t=0 (the first gradient value); in a slice t runs
    from 0 to 1 over its own layers, and a one-layer slice has t = 1."""
    assert layer_fraction(None, 4) == 0.0 and layer_fraction(0, 1) == 1.0
    assert layer_fraction(2, 5) == 0.5
    r = Recipe.from_dict({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
                          "parameters": {"t": [0.1, 0.9]}})
    assert r.value(0, None, "t", "lm_head.weight", layer_fraction(None, 4)) == pytest.approx(0.1)


def test_frankenmerge_slices():
    r = Recipe.from_dict(yaml.safe_load(FRANKEN))
    assert [sl.length for sl in r.slices] == [32, 8] and r.models == (A, B)
    assert r.inputs(0) == (A,) and r.inputs(1) == (B,)  # passthrough ignores the base: each source is merged
    assert r.value(1, B, "scale", "model.layers.27.self_attn.o_proj.weight", 0.0) == 0.5
    assert r.value(1, B, "scale", Q.format(27), 0.0) == 1.0
    assert r.value(0, A, "scale", Q.format(3), 0.0) == 1.0  # mergekit's default (no scaling)
    with pytest.raises(ValueError, match="no model"):
        r.value(0, B, "scale", Q.format(3), 0.0)


def test_slice_level_parameters_and_base():
    d = {"merge_method": "ties", "base_model": "b", "parameters": {"density": 0.9, "weight": 0.1},
         "slices": [{"sources": [{"model": "b", "layer_range": [0, 2]}, {"model": "x", "layer_range": [2, 4]}],
                     "parameters": {"density": 0.4}},
                    {"sources": [{"model": "c", "layer_range": [2, 4]}, {"model": "x", "layer_range": [0, 2]},
                                 {"model": "y", "layer_range": [0, 2], "parameters": {"density": 0.2}}],
                     "base_model": "c"}]}
    r = Recipe.from_dict(d)
    assert r.inputs(0) == ("x",) and r.inputs(1) == ("x", "y") and r.base_of(1) == "c"
    assert r.value(0, "x", "density", UP.format(2), 0.0) == 0.4  # slice beats top level
    assert r.value(1, "x", "density", UP.format(0), 0.0) == 0.9
    assert r.value(1, "y", "density", UP.format(0), 0.0) == 0.2  # the source's own beats both
    assert Recipe.from_dict(r.to_dict()) == r


def test_models_form_precedence_and_defaults():
    r = Recipe.from_dict(yaml.safe_load(TIES))
    assert r.models == ("ja-chat", "math") and r.base_model == "mistralai/Mistral-7B-v0.1"
    assert r.value(0, "ja-chat", "density", UP.format(2), 0.5) == 0.5  # model level beats top level
    assert r.value(0, "math", "density", UP.format(2), 0.5) == 0.7  # first matching filter
    assert r.value(0, "math", "density", Q.format(2), 0.5) == 0.3
    assert r.value(0, "ja-chat", "weight", Q.format(3), 1.0) == pytest.approx(0.8)
    assert r.value(0, None, "normalize", Q.format(0), 0.0) == 1.0  # booleans as floats
    assert r.value(0, None, "lambda", Q.format(0), 0.0) == 1.0  # mergekit's default
    assert r.extra["tokenizer_source"] == "base"


def test_ignored_base_is_merged_like_mergekit():
    """linear / karcher take no base: mergekit merges a base_model as one more input (added when unlisted)."""
    r = Recipe.from_dict({"merge_method": "karcher", "base_model": "b", "models": [{"model": "x"}, {"model": "y"}]})
    assert r.inputs(0) == ("x", "y", "b")
    r = Recipe.from_dict({"merge_method": "linear", "base_model": "b",
                          "models": [{"model": "b", "parameters": {"weight": 1}}, {"model": "x"}]})
    assert r.inputs(0) == ("b", "x")


def test_missing_required_parameter_and_mergekit_defaults():
    r = Recipe.from_dict({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}]})
    with pytest.raises(ValueError, match="no 'weight' for model 'x'"):
        r.value(0, "x", "weight", Q.format(0), 0.0)
    assert r.value(0, "x", "weight", Q.format(0), 0.0, default=1.0) == 1.0
    assert r.value(0, None, "normalize", Q.format(0), 0.0) == 1.0  # the ties preset's default
    assert r.value(0, "x", "density", Q.format(0), 0.0) == 1.0  # mergekit: no sparsification by default
    r = Recipe.from_dict({"merge_method": "della", "base_model": "b", "models": [{"model": "x"}]})
    assert r.value(0, None, "epsilon", Q.format(0), 0.0) == 0.15  # mergekit's, not the search default (0.1)
    with pytest.raises(ValueError, match="no model 'y'"):
        r.value(0, "y", "weight", Q.format(0), 0.0)


def test_conditional_without_match_falls_through_to_top_level():
    r = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": "b", "parameters": {"weight": 0.25},
                          "models": [{"model": "x", "parameters": {"weight": [{"filter": "mlp", "value": 2}]}}]})
    assert r.value(0, "x", "weight", UP.format(0), 0.0) == 2.0
    assert r.value(0, "x", "weight", Q.format(0), 0.0) == 0.25


def test_string_lists_pick_an_anchor():
    assert evaluate(("a", "b", "c"), "t", 0.6) == "b"


@pytest.mark.parametrize("text", [SLERP, TIES, FRANKEN])
def test_round_trip(text, tmp_path):
    r = Recipe.from_dict(yaml.safe_load(text))
    r.dump(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml") == r
    assert Recipe.load(tmp_path / "r.yaml").to_dict() == yaml.safe_load(text)
    assert "[0, 0.5, 0.3, 0.7, 1]" in r.dump() or "[0.2, 0.8]" in r.dump() or "[24, 32]" in r.dump()


@pytest.mark.parametrize(("change", "message"), [
    ({"merge_method": "nope"}, "known"),
    ({"modules": {"a": {}}}, "modules"),
    ({"slices": [{"sources": []}]}, "non-empty list"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 8]}, {"model": "b", "layer_range": [8, 12]}]}]},
     "same number of layers"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [4, 2]}]}]}, "0 <= start < end"),
    ({"slices": [{"sources": [{"model": "a"}]}]}, "layer_range"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "a", "layer_range": [2, 4]}]}]},
     "twice"),
    ({"models": [{"model": "x"}]}, "exactly one of"),
])
def test_unsupported_recipes_are_refused_clearly(change, message):
    d = yaml.safe_load(SLERP) | change
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(d)

"""Recipe validation: every bad input is refused with a message naming the key and the fix."""

from __future__ import annotations

import pytest

from optimizer import UserError
from optimizer.moe.config import load_moe_config
from optimizer.resources import CONF_DIR

P = {"a": ["12+35=47"], "b": ["rev:abc>cba"], "c": ["UP:cat>CAT"]}


def good(**extra) -> dict:
    data = {"base_model": "base", "gate_mode": "hidden", "experts_per_token": 1,
            "experts": [{"source_model": m, "positive_prompts": P[m]} for m in ("a", "b", "c")]}
    data.update(extra)
    return data


def test_valid_recipe_parses_with_defaults() -> None:
    cfg = load_moe_config(good())
    assert cfg.expert_names == ["a", "b", "c"]
    assert cfg.calibrate.steps == 0 and cfg.shared == "base" and cfg.dtype == "auto"
    assert cfg.calibrate.per_trial == "reuse"
    assert load_moe_config(cfg.to_dict()) == cfg  # to_dict round-trips


def test_mergekit_nulls_take_defaults() -> None:
    cfg = load_moe_config(good(dtype=None, architecture=None))
    assert cfg.dtype == "auto" and cfg.architecture == "mixtral"


def test_random_gates_need_no_prompts() -> None:
    cfg = load_moe_config(good(gate_mode="random", experts=["x/a", "y/b"]))
    assert cfg.expert_names == ["a", "b"]


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["experts"][1].update(source_model="a"), "same model as experts[0]"),
    (lambda d: d["experts"][2].update(positive_prompts=P["a"]), "identical positive_prompts"),
    (lambda d: d["experts"][1].update(positive_prompts=[]), "experts[1].positive_prompts is empty"),
    (lambda d: d.update(experts_per_token=4), "experts_per_token=4 but there are 3 experts"),
    (lambda d: d.update(experts_per_token=0), "between 1 and 3"),
    (lambda d: d.update(gate_mode="learned"), "gate_mode='learned'"),
    (lambda d: d.update(shared="avg"), "shared='avg'"),
    (lambda d: d.update(dtype="int8"), "dtype='int8'"),
    (lambda d: d.update(experts=d["experts"][:1]), "at least 2"),
    (lambda d: d.pop("base_model"), "base_model is missing"),
    (lambda d: d.update(gate_mod="hidden"), "gate_mod: unknown key"),
    (lambda d: d["experts"][0].update(positive_prompt=["x"]), "experts[0].positive_prompt: unknown key"),
    (lambda d: d.update(calibrate={"step": 3}), "calibrate.step: unknown key"),
    (lambda d: d.update(calibrate={"steps": 10, "lr": 0}), "calibrate: steps must be"),
    (lambda d: d.update(calibrate={"per_trial": "each"}), "per_trial='each' must be one of reuse, refit, full"),
    (lambda d: d.update(calibrate={"per_trial": "refit", "refit_prompts": 0}), "refit_prompts >= 1"),
    (lambda d: d.update(shared_experts=[]), "shared_experts: shared experts"),
    (lambda d: d["experts"][1].update(name="a"), "both named 'a'"),
    (lambda d: d["experts"][1].update(noise_scale=0.1), "experts[1].noise_scale: gate noise"),
    (lambda d: d.update(gate_mode="uniform_random"), "use random"),
    (lambda d: d.update(architecture="qwen"), "only mixtral"),
])
def test_bad_recipes_are_refused_with_advice(mutate, needle) -> None:
    data = good()
    mutate(data)
    with pytest.raises(UserError, match=None) as err:
        load_moe_config(data)
    assert needle in str(err.value)


def test_calibration_needs_prompts_even_for_random_gates() -> None:
    data = good(gate_mode="random", calibrate={"steps": 5})
    data["experts"][0]["positive_prompts"] = []
    with pytest.raises(UserError, match="calibrate.steps > 0"):
        load_moe_config(data)


def test_missing_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_moe_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("base_model: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_moe_config(tmp_path / "bad.yaml")


def test_demo_recipe_and_hydra_node_parse() -> None:

    from omegaconf import OmegaConf

    path = CONF_DIR / "moe" / "demo.yaml"
    cfg = load_moe_config(path)
    assert cfg.expert_names == ["add", "rev", "kana"] and cfg.calibrate.steps > 0
    assert load_moe_config(OmegaConf.load(path)) == cfg

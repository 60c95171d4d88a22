"""Every registered merge method has a `conf/merge/<method>.yaml` that composes and builds a search space."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import MistralConfig, MistralForCausalLM

from optimizer.cli import CONF_DIR
from optimizer.config import register_configs
from optimizer.merge.registry import METHODS
from optimizer.space import SearchSpace, derive_layout


@pytest.fixture(scope="module")
def mistral_names():
    cfg = MistralConfig(num_hidden_layers=4)  # Mistral-7B widths on the meta device: nothing allocated
    with torch.device("meta"):
        model = MistralForCausalLM(cfg)
    return [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_config_composes_into_a_search_space(method, mistral_names):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=[f"merge={method}"])
    assert cfg.merge.method == method
    first = (Path(CONF_DIR) / "merge" / f"{method}.yaml").read_text().splitlines()[0]
    assert first.startswith("# python -m optimizer ") and f"merge={method}" in first
    spec = METHODS[method]
    models = ["a", "b"][: spec.max_models or 2]
    space = SearchSpace(spec, models, derive_layout(mistral_names, cfg.mode.granularity), cfg.merge)
    units = len(space.layout.units)
    per_param = {p.name: units * (len(models) if p.scope == "model" else 1) for p in spec.params}
    assert len(space) == sum(per_param[p] for p in space.searched)
    assert cfg.merge.baselines, f"conf/merge/{method}.yaml enqueues no baseline"
    for b in cfg.merge.baselines:
        values = space.baseline(b)
        assert all(p.low <= values[p.name] <= p.high for p in space.params), (method, b)
        plan = space.plan(values)
        assert plan.method == method
        mp, gp = plan.resolve("model.layers.1.mlp.down_proj.weight")
        assert all(len(v) == len(models) for v in mp.values())
        for name, value in b.items():  # the baseline's values reach the plan
            got = mp[name] if spec.param(name).scope == "model" else [gp[name]]
            assert got == [pytest.approx(value)] * len(got)


def test_the_documented_search_choices():
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        ties = compose(config_name="config", overrides=["merge=ties"]).merge
        slerp = compose(config_name="config", overrides=["merge=slerp"]).merge
    assert list(ties.search) == ["weight", "density"]
    assert [dict(b) for b in ties.baselines] == [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    assert list(slerp.search) == ["t"] and [dict(b) for b in slerp.baselines] == [{"t": 0.5}]

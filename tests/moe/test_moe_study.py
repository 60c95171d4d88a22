"""A short study through the live MoE: only live dimensions searched, resumable, exported as Mixtral."""

import json

import optuna
from omegaconf import OmegaConf

from optimizer.config import Config
from optimizer.runner import run

from .conftest import recipe


def moe_cfg(zoo, tmp_path, **kw):
    cfg = OmegaConf.structured(Config)
    cfg.moe = recipe(zoo, calibrate={"steps": 20})
    cfg.evaluator = {"name": "lm_toy"}
    cfg.merge.baselines = [{"weight": 1.0}]
    cfg.run_root = str(tmp_path / "runs")
    cfg.study_name = "moe"
    cfg.sampler.name = "random"
    cfg.export.heldout_top_k = 2
    return OmegaConf.merge(cfg, kw)


def test_moe_study_runs_resumes_and_exports(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = moe_cfg(zoo, tmp_path, n_trials=3)
    assert run(cfg) == 0
    assert run(OmegaConf.merge(cfg, {"n_trials": 5})) == 0
    study = optuna.load_study(study_name="moe", storage=f"sqlite:///{tmp_path}/runs/moe/study.db")
    assert len(study.trials) == 5
    names = list(study.trials[-1].params)
    assert names and all("layer." in n for n in names)  # shared=base: embeddings/norm/lm_head are dead
    assert {n.split("/")[1] for n in names} == {"add", "rev", "up"}
    best = tmp_path / "runs/moe/best"
    model = AutoModelForCausalLM.from_pretrained(best)
    assert type(model).__name__ == "MixtralForCausalLM"
    scores = json.loads((best / "scores.json").read_text())
    assert set(scores["references"]) == {"base", "add", "rev", "up"}  # dense references beside the MoE

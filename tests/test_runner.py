"""The study loop: resume to a total, baselines first, interruption, failures, refusal to mix spaces."""

import json

import optuna
import pytest
from omegaconf import OmegaConf

from optimizer import UserError
from optimizer.config import Config
from optimizer.eval import EvaluationFailed
from optimizer.runner import run

from .conftest import ToyEvaluator


def make_cfg(tiny_models, tmp_path, **kw):
    cfg = OmegaConf.structured(Config)
    cfg.models.base = str(tiny_models["base"])
    cfg.models.models = {"a": str(tiny_models["a"]), "b": str(tiny_models["b_sharded"])}
    cfg.evaluator = {"name": "toy", "paths": {k: str(tiny_models[k]) for k in ("base", "a", "b")}}
    cfg.merge.baselines = [{"weight": 1.0}, {"weight": 0.5}]
    cfg.merge.bounds = {"weight": [0.0, 1.5]}
    cfg.run_root = str(tmp_path / "runs")
    cfg.study_name = "t"
    cfg.sampler.name = "tpe"
    return OmegaConf.merge(cfg, kw)


def load(cfg):
    return optuna.load_study(study_name=cfg.study_name, storage=f"sqlite:///{cfg.run_root}/{cfg.study_name}/study.db")


def test_rerun_reaches_the_total_and_baselines_come_first(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=4)
    assert run(cfg) == 0
    assert run(OmegaConf.merge(cfg, {"n_trials": 7})) == 0
    study = load(cfg)
    assert len(study.trials) == 7
    assert study.trials[0].user_attrs["baseline"] == "weight=1.0"
    assert set(study.trials[1].params.values()) == {0.5}
    assert study.user_attrs["config"]["n_trials"] == 7
    assert run(cfg) == 0 and len(load(cfg).trials) == 7  # already past the total: nothing runs
    assert study.user_attrs["space"]["granularity"] == "layer"


def test_best_export_is_loadable_and_scored(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tiny_models, tmp_path, n_trials=6)
    assert run(cfg) == 0
    best = tmp_path / "runs" / "t" / "best"
    scores = json.loads((best / "scores.json").read_text())
    assert scores["best"]["trial"] == load(cfg).best_trial.number
    assert set(scores["references"]) == {"base", "a", "b"}
    assert set(scores["baselines"]) == {"weight=1.0", "weight=0.5"}
    assert "heldout" in scores["best"] and scores["best_expert"]["name"] in ("a", "b")
    model = AutoModelForCausalLM.from_pretrained(best)
    assert model.config.num_hidden_layers == 3
    assert "merge_method: task_arithmetic" in (best / "recipe.yaml").read_text()


def test_incompatible_resume_is_refused_and_nothing_is_added(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=3)
    run(cfg)
    with pytest.raises(UserError, match="different mode.granularity"):
        run(OmegaConf.merge(cfg, {"mode": {"granularity": "parameter"}, "n_trials": 5}))
    assert len(load(cfg).trials) == 3


def test_bad_bounds_add_nothing(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=2)
    run(cfg)
    with pytest.raises(UserError, match="low is greater than high"):
        run(OmegaConf.merge(cfg, {"merge": {"bounds": {"weight": [1.0, 0.5]}}, "n_trials": 4}))
    assert len(load(cfg).trials) == 2


def test_interrupt_exports_best_then_resume_completes(tiny_models, tmp_path, monkeypatch):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=6)
    real = ToyEvaluator.evaluate

    def flaky(self, *a, **kw):
        if self.calls == 3:
            self.calls += 1
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(ToyEvaluator, "evaluate", flaky)
    assert run(cfg) == 130
    assert (tmp_path / "runs" / "t" / "best" / "scores.json").exists()
    monkeypatch.setattr(ToyEvaluator, "evaluate", real)
    assert run(cfg) == 0
    states = [t.state for t in load(cfg).trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6
    assert states.count(optuna.trial.TrialState.FAIL) == 1


def test_repeated_failures_stop_with_a_clear_error(tiny_models, tmp_path, monkeypatch):
    def broken(self, *a, **kw):
        raise EvaluationFailed("judge unreachable")

    monkeypatch.setattr(ToyEvaluator, "evaluate", broken)
    cfg = make_cfg(tiny_models, tmp_path, n_trials=10, max_failures=3)
    with pytest.raises(UserError, match="3 trials failed in a row.*judge unreachable"):
        run(cfg)
    study = load(cfg)
    assert len(study.trials) == 3
    assert study.trials[0].user_attrs["fail_reason"] == "judge unreachable"


def test_trial_artifacts_are_stored(tiny_models, tmp_path):
    from optuna.artifacts import get_all_artifact_meta

    cfg = make_cfg(tiny_models, tmp_path, n_trials=2)
    run(cfg)
    study = load(cfg)
    metas = get_all_artifact_meta(study.trials[0], storage=study._storage)
    assert {m.filename for m in metas} >= {"recipe.yaml", "scores.json", "plan.json"}


def test_export_cli_reexports_a_chosen_trial(tiny_models, tmp_path):
    from optimizer.export.cli import export

    cfg = make_cfg(tiny_models, tmp_path, n_trials=3)
    run(cfg)
    assert export(OmegaConf.merge(cfg, {"trial": 1})) == 0
    out = tmp_path / "runs" / "t" / "trial_1"
    assert json.loads((out / "scores.json").read_text())["best"]["trial"] == 1
    with pytest.raises(UserError, match="trial=99 is not a completed trial"):
        export(OmegaConf.merge(cfg, {"trial": 99}))

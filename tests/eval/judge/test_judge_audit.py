"""What a run leaves behind: per-trial artifacts the dashboard serves, user attrs, and never the API key.

The real runner (`optimizer.runner.run`) drives an `evaluator=mt_bench` study over tiny models, judged by a
fake OpenAI server that injects an auth error and retried faults; the same search-space point is tried
twice (bounds [0.5, 0.5]), so the second trial's answers are the first one's and its judgments come from
the cache.
"""

import io
import json
import logging
from dataclasses import asdict
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
import torch
from judge_fakes import KEY_ENV, SECRET, build_model, judge_cfg
from omegaconf import OmegaConf
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta
from optuna.trial import TrialState
from optuna_dashboard import wsgi

from optimizer.config import Config
from optimizer.runner import run

PER_TRIAL = {"answers.jsonl", "judgments.jsonl", "recipe.yaml", "plan.json", "scores.json"}


@pytest.fixture(scope="module")
def models(tiny_lm, tmp_path_factory):
    """base and two fine-tunes (seeded noise) of the judge tests' tiny model, with its chat template."""
    base, tok = tiny_lm
    root = tmp_path_factory.mktemp("audit_models")
    out = {}
    for i, name in enumerate(["base", "a", "b"]):
        model = build_model(tok)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def study_cfg(models, server, tmp_path, **evaluator):
    cfg = OmegaConf.structured(Config)
    cfg.models.base = models["base"]
    cfg.models.models = {"a": models["a"], "b": models["b"]}
    cfg.evaluator = {"name": "mt_bench", "bench_dir": "data/mt_bench/en", "max_new_tokens": 6, "batch_size": 8,
                     "limit": 4, "heldout_share": 0.0, **evaluator}
    cfg.judge = asdict(judge_cfg(server))
    cfg.merge.baselines = [{"weight": 0.5}]
    cfg.merge.bounds = {"weight": [0.5, 0.5]}  # every trial is the same merge: trial 1 re-asks trial 0's judgments
    cfg.mode.granularity = "all"
    cfg.sampler.name = "random"
    cfg.run_root, cfg.study_name, cfg.n_trials, cfg.device = str(tmp_path / "runs"), "audit", 2, "cpu"
    return cfg


def load(cfg):
    return optuna.load_study(study_name="audit", storage=f"sqlite:///{cfg.run_root}/audit/study.db")


def _get(app, path):
    env = {"PATH_INFO": path, "wsgi.input": io.BytesIO()}
    setup_testing_defaults(env)
    status = []
    body = b"".join(app(env, lambda s, h, exc_info=None: status.append(s)))
    return status[0], body


def served(cfg, study, trial) -> dict[str, bytes]:
    """Every artifact of `trial` as optuna-dashboard serves it (HTTP 200 asserted)."""
    store = FileSystemArtifactStore(str(tmp_runs(cfg) / "artifacts"))
    app = wsgi(f"sqlite:///{cfg.run_root}/audit/study.db", artifact_store=store)
    out = {}
    for meta in get_all_artifact_meta(trial, storage=study._storage):
        status, body = _get(app, f"/artifacts/{study._study_id}/{trial._trial_id}/{meta.artifact_id}")
        assert status.startswith("200"), meta.filename
        out[meta.filename] = body
    return out


def tmp_runs(cfg) -> Path:
    return Path(cfg.run_root) / cfg.study_name


def test_runner_artifacts_open_in_dashboard_and_no_key_anywhere(models, openai_server, judge_key, tmp_path,
                                                                  caplog, capfd):
    caplog.set_level(logging.DEBUG)
    openai_server.faults.extend(["401", "429:ms", "500"])  # an auth error, and two faults that are retried
    cfg = study_cfg(models, openai_server, tmp_path, max_failed_share=0.5)
    assert run(cfg) == 0

    study = load(cfg)
    first, second = study.trials
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 and first.params == second.params
    assert first.user_attrs["judge_failures"] == 1 and first.user_attrs["judge_new"] == 7
    assert first.user_attrs["judge_retries"] >= 2
    assert second.user_attrs["judge_cache_hits"] == 7 and second.user_attrs["judge_new"] == 1  # only the 401 one
    assert first.user_attrs["scores"]["mt_bench"] == pytest.approx(first.value)
    for t in study.trials:
        files = served(cfg, study, t)
        assert set(files) == PER_TRIAL
        judgments = [json.loads(line) for line in files["judgments.jsonl"].decode().splitlines()]
        assert len(judgments) == 8 and all("user_prompt" in j for j in judgments)
        assert json.loads(files["scores.json"])["tasks"] == t.user_attrs["scores"]
        if t is first:
            bad = [j for j in judgments if j["score"] is None]
            assert len(bad) == 1 and KEY_ENV in bad[0]["error"]  # names the variable, never its value

    app = wsgi(f"sqlite:///{cfg.run_root}/audit/study.db")
    status, body = _get(app, f"/api/studies/{study._study_id}")
    assert status.startswith("200") and SECRET.encode() not in body
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {".judge_cache.sqlite", "study.db", "scores.json", "model.safetensors"} <= names
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p
    out, err = capfd.readouterr()
    assert SECRET not in caplog.text and SECRET not in out and SECRET not in err
    assert any("retry" in r.getMessage() for r in caplog.records)  # the logs were really captured


def test_failed_trial_keeps_its_audit_trail(models, openai_server, judge_key, tmp_path):
    """Too many failed judgments: the trial FAILs unscored, its answers, judgments and recipe stay."""
    openai_server.faults.extend(["401"] * 8)  # every judgment of the first trial
    cfg = study_cfg(models, openai_server, tmp_path, max_failed_share=0.2)
    assert run(cfg) == 0
    study = load(cfg)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    failed = study.trials[0]
    assert "8/8 judgments failed" in failed.user_attrs["fail_reason"] and failed.user_attrs["judge_failures"] == 8
    files = served(cfg, study, failed)
    assert set(files) == PER_TRIAL - {"scores.json"}
    judgments = [json.loads(line) for line in files["judgments.jsonl"].decode().splitlines()]
    assert len(judgments) == 8 and all(j["score"] is None and KEY_ENV in j["error"] for j in judgments)
    assert study.trials[1].user_attrs["judge_new"] == 8  # failures are not cached: asked again

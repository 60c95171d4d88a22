"""End to end: the real CLI on the demo zoo, as the README runs it (few trials), then a resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent


def test_cli_on_demo_zoo_runs_resumes_and_exports(tmp_path):
    from optimizer.zoo import ensure_zoo

    ensure_zoo()  # built once per machine (cached); the CLI would build it too
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "optimizer", "study_name=e2e", f"run_root={tmp_path}", "threads=1",
            "sampler=tpe", "export.heldout_top_k=2"]
    first = subprocess.run([*args, "n_trials=3"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[  3/3]" in first.stdout and "optuna-dashboard sqlite:///" in first.stdout
    second = subprocess.run([*args, "n_trials=4"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 finished trials, target 4" in second.stdout
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path}/e2e/study.db")
    assert len(study.trials) == 4
    assert set(study.trials[0].user_attrs["scores"]) == {"zoo_add", "zoo_rev", "zoo_kana"}
    best = tmp_path / "e2e" / "best"
    scores = json.loads((best / "scores.json").read_text())
    assert set(scores["references"]) == {"base", "add", "rev", "kana"}
    assert scores["best"]["heldout"]["objective"] >= 0.0 and scores["best_expert"]["name"] in ("add", "rev", "kana")
    assert (best / "model.safetensors").exists() and (best / "tokenizer.json").exists()
    assert "merge_method: task_arithmetic" in (best / "recipe.yaml").read_text()

"""Console output of a run: one line per failed trial, failure budget, markup-safe reasons, the closing lines."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
from omegaconf import OmegaConf
from rich.console import Console

from optimizer.config import Config
from optimizer.eval import EvaluationFailed
from optimizer.progress import Progress, print_run_end, tool

REASON = "4 of 4 judgments failed (max_failed_share=0.2); first error: no [[rating]] in the reply"


def session(tmp_path, **kw):
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"run_root": str(tmp_path), "study_name": "s", **kw})
    return SimpleNamespace(cfg=cfg, run_dir=tmp_path / "s")


def failing_run(tmp_path, n_trials, max_failures=5, done=0):
    """Run an always-failing objective the way the runner does; returns (study, progress, console, records)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    console = Console(record=True, width=200)
    progress = Progress(session(tmp_path, max_failures=max_failures), n_trials, console, done=done)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("optuna").addHandler(handler)

    def objective(trial):
        trial.suggest_float("weight/a/layer.0", 0, 1)
        trial.set_user_attr("fail_reason", REASON)
        raise EvaluationFailed(REASON)

    try:
        study.optimize(objective, catch=(EvaluationFailed,), n_trials=50,
                       callbacks=[optuna.study.MaxTrialsCallback(n_trials), progress])
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    return study, progress, console, records


def test_a_run_asked_for_two_trials_stops_after_two_failures(tmp_path):
    study, progress, _, _ = failing_run(tmp_path, n_trials=2)
    assert len(study.trials) == 2
    assert progress.aborted.startswith("2 trials failed in a row (as many as the 2 trials this run was asked for")


def test_a_long_run_stops_after_max_failures(tmp_path):
    study, progress, _, _ = failing_run(tmp_path, n_trials=30, max_failures=3)
    assert len(study.trials) == 3 and "(max_failures=3)" in progress.aborted


def test_a_resumed_run_counts_only_what_it_was_asked_for(tmp_path):
    study, _, _, _ = failing_run(tmp_path, n_trials=31, done=30)
    assert len(study.trials) == 1


def test_a_failed_trial_is_one_line_with_its_reason_verbatim(tmp_path):
    _, _, console, records = failing_run(tmp_path, n_trials=2)
    lines = console.export_text().splitlines()
    assert lines == [f"[  0/2] trial {i} FAILED: {REASON}" for i in (0, 1)]  # [[rating]] survives rich markup
    failed = [r.getMessage() for r in records if "failed" in r.getMessage()]
    assert failed == []  # Optuna's parameter dump, traceback and "failed with value None" are not printed


def test_other_errors_keep_optunas_traceback(tmp_path):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("optuna").addHandler(handler)
    Progress(session(tmp_path), 1, Console(record=True))  # installs the filter
    try:
        optuna.create_study().optimize(lambda t: 1 / 0, n_trials=1, catch=(ZeroDivisionError,))
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    assert any("failed with parameters" in r.getMessage() and r.exc_info for r in records)
    assert any("Trial 0 failed with value None" in r.getMessage() for r in records)


def test_tools_are_named_by_their_path_in_the_environment():
    here = Path(sys.executable).parent / "optuna-dashboard"
    assert tool("optuna-dashboard") == (str(here) if here.is_file() else "optuna-dashboard")
    assert tool("no-such-tool-here") == "no-such-tool-here"


def test_the_end_of_a_run_says_where_the_results_are(tmp_path):
    s = session(tmp_path, run_root=str(tmp_path))
    best = s.run_dir / "best"
    best.mkdir(parents=True)
    (best / "scores.json").write_text(json.dumps({
        "best": {"trial": 17, "chosen_by": "heldout", "search": {"objective": 0.70}, "heldout": {"objective": 0.68}},
        "references": {"base": {"heldout": {"objective": 0.60}}},
        "best_expert": {"name": "add", "split": "heldout", "objective": 0.65}}))
    console = Console(record=True, width=400)
    print_run_end(s, console)
    text = console.export_text()
    assert ("held-out: trial 17 scores 0.6800 (search 0.7000, chosen by held-out score among the top trials); "
            "alone: base 0.6000, best expert add 0.6500") in text
    assert f"scores:    {best / 'scores.json'}" in text
    assert f"report:    {sys.executable} -m optimizer.report study_name=s run_root={tmp_path}" in text
    assert f"dashboard: {tool('optuna-dashboard')} sqlite:///{(s.run_dir / 'study.db').resolve()} --artifact-dir" in text


def test_no_second_held_out_line_when_the_export_prints_its_comparison(tmp_path):
    s = session(tmp_path, run_root=str(tmp_path))
    (s.run_dir / "best").mkdir(parents=True)
    (s.run_dir / "best" / "scores.json").write_text(json.dumps({
        "best": {"trial": 3, "search": {"objective": 0.7}, "heldout": {"objective": 0.6}},
        "comparison": {"rows": []}}))
    console = Console(record=True, width=400)
    print_run_end(s, console)
    text = console.export_text()
    assert "held-out:" not in text and "scores:    " in text and "report:    " in text

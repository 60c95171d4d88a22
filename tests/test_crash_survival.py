"""kill -9 at random points (start-up, mid-trial, export), then rerun: nothing completed is lost, nothing
stays RUNNING, the study reaches its exact total, best/ loads and is current, and no temp folder is left.

The loop is benchmarks/kill_runs.py's (which runs it on the demo zoo with the real CLI); here the worker is
the toy one on the tiny models, slowed to 0.3 s per evaluation so that kills land inside trials and exports.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

from .toy_worker import toy_config

ROOT = Path(__file__).resolve().parent.parent
KILLS = 6  # two per phase


@pytest.mark.slow
def test_random_kill_9_loses_nothing_and_the_rerun_finishes(tiny_models, tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.kill_runs import kill_loop, report

    seed = int(os.environ.get("CRASH_SEED", random.randrange(10**6)))
    run_root = tmp_path / "runs"

    def command(n_trials: int) -> list[str]:
        path = tmp_path / f"cfg-{n_trials}.json"
        path.write_text(json.dumps(toy_config(tiny_models, run_root, sleep=0.3, n_trials=n_trials,
                                              study_name="crash")))
        return [sys.executable, "-m", "tests.toy_worker", str(path)]

    lines: list[str] = []
    summary = kill_loop(command, f"sqlite:///{run_root / 'crash' / 'study.db'}", "crash", run_root / "crash",
                        KILLS, 2, random.Random(seed), {**os.environ, "PYTHONUNBUFFERED": "1"},
                        say=lines.append)
    report(summary, lines.append)
    table = f"CRASH_SEED={seed}\n" + "\n".join(lines)
    print(table)
    assert summary.ok, table
    assert sum(r.killed for r in summary.rounds) >= KILLS - 2, table  # the kills really landed
    assert not any(r.lost or r.best == "PARTIAL" for r in summary.rounds), table

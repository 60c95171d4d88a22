"""Several workers on one study: 3 processes on SQLite, the journal and a real PostgreSQL server reach exactly
`n_trials` finished trials, run each baseline once, and leave one `best/` made from the final study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from .postgres_server import postgres  # noqa: F401  (fixture)
from .toy_worker import toy_config

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 3
N_TRIALS = 12


def start_workers(cfg: dict, run_root: Path, n: int, env: dict[str, str]) -> list[subprocess.Popen]:
    """`n` toy workers on `cfg`, released together once all have imported everything."""
    run_root.mkdir(parents=True, exist_ok=True)
    path = run_root / f"{cfg['study_name']}.json"
    path.write_text(json.dumps(cfg))
    barrier = run_root / f"{cfg['study_name']}.go"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOY_WORKER_BARRIER": str(barrier), **env}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.toy_worker", str(path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(n)]
    deadline = time.time() + 300
    while len(list(run_root.glob(f"{barrier.name}.*.ready"))) < n:
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            outs = " | ".join(p.communicate()[0][-2000:] for p in procs)
            raise AssertionError(f"workers did not start: {outs}")
        time.sleep(0.1)
    barrier.touch()
    return procs


def storage_of(kind: str, run_dir: Path, url: str | None) -> optuna.storages.BaseStorage:
    if kind == "sqlite":
        return optuna.storages.RDBStorage(f"sqlite:///{run_dir / 'study.db'}")
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(run_dir / "journal.log")))
    from optimizer.study import with_driver

    return optuna.storages.RDBStorage(with_driver(url))


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_three_workers_reach_the_exact_total_with_one_consistent_best(kind, tiny_models, tmp_path, request):
    from transformers import AutoModelForCausalLM

    from optimizer.export.write import is_current

    url = request.getfixturevalue("postgres") if kind == "postgresql" else None
    name = f"w-{kind}"
    cfg = toy_config(tiny_models, tmp_path / "runs", sleep=0.6, n_trials=N_TRIALS, study_name=name,
                     storage={"kind": kind})
    procs = start_workers(cfg, tmp_path / "runs", WORKERS, {"OPTUNA_STORAGE_URL": url} if url else {})
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * WORKERS, "\n----\n".join(o[-3000:] for o in outs)

    run_dir = tmp_path / "runs" / name
    study = optuna.load_study(study_name=name, storage=storage_of(kind, run_dir, url))
    trials = study.get_trials()
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    assert len(by_state[TrialState.COMPLETE]) + len(by_state[TrialState.PRUNED]) == N_TRIALS
    assert not by_state[TrialState.RUNNING]
    assert all(t.user_attrs.get("surplus") for t in by_state[TrialState.FAIL])  # only lost races, no errors
    for label in ("weight=1.0", "weight=0.5"):  # each baseline enqueued and run once, not once per worker
        assert [t.state for t in trials if t.user_attrs.get("baseline") == label] == [TrialState.COMPLETE]
    pids = {t.user_attrs["worker"]["pid"] for t in by_state[TrialState.COMPLETE]}
    table = [(t.number, t.state.name, t.user_attrs.get("worker", {}).get("pid"), t.user_attrs.get("fail_reason"))
             for t in trials]
    assert len(pids) >= 2, f"the workers did not share the study: {table}\n" + "\n----\n".join(
        o[-1500:] for o in outs)

    best = run_dir / "best"
    assert is_current(best, study), "best/ was not written from the final study"
    scores = json.loads((best / "scores.json").read_text())
    assert scores["best"]["trial"] in {t.number for t in by_state[TrialState.COMPLETE]}
    assert AutoModelForCausalLM.from_pretrained(best).config.num_hidden_layers == 3
    assert not [p.name for p in run_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    if url:  # the password came from the environment: nothing written or printed holds it
        from .postgres_server import PASSWORD

        assert all(PASSWORD not in o for o in outs)
        files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
        assert not [p for p in files if PASSWORD in p.read_text(errors="ignore")]

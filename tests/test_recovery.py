"""Crash recovery: trials of dead workers are failed and re-enqueued at start-up, baselines re-run, exact
totals, export leftovers cleaned. The real kill -9 loop is tests/test_crash_survival.py."""

import os
import subprocess
import time

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from optimizer.export.write import clean_temps
from optimizer.recovery import (
    HEARTBEAT,
    WORKER,
    Guard,
    Requeue,
    StopAtTotal,
    Surplus,
    identity,
    is_dead,
    recover,
)
from optimizer.runner import run

from .test_runner import load, make_cfg

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def dead_worker() -> dict:
    return {**identity(), "pid": dead_pid(), "start": "1"}


def states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_dead_workers_trial_is_failed_and_requeued_even_when_the_total_is_reached(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=3)
    assert run(cfg) == 0
    study = load(cfg)
    orphan = study.ask(study.trials[2].distributions)  # a 4th trial whose worker died mid-trial
    orphan.set_user_attr(WORKER, dead_worker())
    params = orphan.params
    assert run(cfg) == 0  # total already reached: nothing runs, but the orphan is recovered
    study = load(cfg)
    assert study.trials[orphan.number].state == TrialState.FAIL
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].params == params and WORKER not in waiting[0].user_attrs
    assert TrialState.RUNNING not in states(study)
    assert run(OmegaConf.merge(cfg, {"n_trials": 4})) == 0  # the retry runs first, with the same parameters
    study = load(cfg)
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == orphan.number)
    assert retry.state == TrialState.COMPLETE and retry.params == params
    assert sum(t.state in FINISHED for t in study.trials) == 4


def test_a_killed_baseline_is_run_again(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=1)
    assert run(cfg) == 0  # baseline weight=1.0 done, weight=0.5 waits
    study = load(cfg)
    popped = study.ask()  # the waiting baseline starts... and its worker dies before it suggests anything
    popped.set_user_attr(WORKER, dead_worker())
    assert popped.user_attrs["baseline"] == "weight=0.5" and not popped.params
    assert run(OmegaConf.merge(cfg, {"n_trials": 3})) == 0
    study = load(cfg)
    done = {t.user_attrs.get("baseline") for t in study.trials if t.state == TrialState.COMPLETE}
    assert {"weight=1.0", "weight=0.5"} <= done
    assert set(next(t for t in study.trials if t.user_attrs.get("baseline") == "weight=0.5"
                    and t.state == TrialState.COMPLETE).params.values()) == {0.5}


def test_baselines_come_back_past_max_retry(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=1, storage={"max_retry": 0})
    assert run(cfg) == 0
    study = load(cfg)
    popped = study.ask()
    popped.set_user_attr(WORKER, dead_worker())
    assert run(cfg) == 0  # max_retry=0: Optuna's retry gives up, the baseline is enqueued by label
    waiting = [t for t in load(cfg).trials if t.state == TrialState.WAITING]
    assert [t.user_attrs["baseline"] for t in waiting] == ["weight=0.5"]


def test_unstamped_running_trial_is_dead_after_the_grace_period(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=2, storage={"heartbeat_interval": 1, "grace_period": 2})
    assert run(cfg) == 0
    study = load(cfg)
    study.ask()  # killed while its parameters were sampled: no worker stamp, no heartbeat
    assert run(cfg) == 0 and TrialState.RUNNING in states(load(cfg))  # young: could be a live worker's
    time.sleep(2.2)
    assert run(cfg) == 0 and TrialState.RUNNING not in states(load(cfg))


def test_is_dead_rules():
    me = identity()
    now = time.time()

    def trial(attrs, start=None):
        t = optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.0, user_attrs=attrs)
        t.datetime_start = start
        return t

    assert not is_dead(trial({WORKER: me}), me, 60, False)  # this very process
    assert is_dead(trial({WORKER: dead_worker()}), me, 60, False)
    assert is_dead(trial({WORKER: {**me, "start": "0"}}), me, 60, False)  # the PID now names another process
    assert is_dead(trial({WORKER: {**me, "boot": "another-boot"}}), me, 60, False)
    other = {**me, "host": "elsewhere", "pid": 1}
    assert not is_dead(trial({WORKER: other, HEARTBEAT: now - 5}), me, 60, False)
    assert is_dead(trial({WORKER: other, HEARTBEAT: now - 100}), me, 60, False)  # journal: stale heartbeat
    assert not is_dead(trial({WORKER: other, HEARTBEAT: now - 100}), me, 60, True)  # RDB: Optuna decides


def test_requeue_drops_the_dead_workers_stamps():
    study = optuna.create_study()
    study.enqueue_trial({"x": 0.25}, user_attrs={"baseline": "x=0.25"})
    t = study.ask()
    t.suggest_float("x", 0, 1)
    t.set_user_attr(WORKER, dead_worker())
    t.set_user_attr(HEARTBEAT, 1.0)
    study.tell(t, state=TrialState.FAIL)
    Requeue(max_retry=2)(study, study.trials[0])
    retry = study.trials[1]
    assert retry.state == TrialState.WAITING and retry.params == {"x": 0.25}
    assert retry.user_attrs == {"baseline": "x=0.25"} and retry.system_attrs["failed_trial"] == 0


def test_recover_fails_only_dead_trials():
    study = optuna.create_study()
    alive, dead = study.ask(), study.ask()
    alive.set_user_attr(WORKER, identity())
    dead.set_user_attr(WORKER, dead_worker())
    assert recover(study, 60, Requeue(2)) == [dead.number]
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]


def test_guard_turns_a_trial_past_the_total_into_a_surplus_and_gives_back_its_parameters():
    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for v in (0.1, 0.2):
        study.add_trial(optuna.trial.create_trial(params={"x": v}, distributions=dist, value=v))
    other = study.ask()  # another live worker runs the third and last slot
    other.set_user_attr(WORKER, identity())
    study.enqueue_trial({"x": 0.9}, user_attrs={"baseline": "x=0.9"})
    ran = []
    guard = Guard(lambda t: ran.append(t.number) or t.suggest_float("x", 0, 1), 3, None, lambda: [])
    study.optimize(guard, n_trials=5, catch=(Surplus,))
    assert not ran and len(study.trials) == 5  # one surplus trial, then the worker stopped
    assert study.trials[3].state == TrialState.FAIL and study.trials[3].user_attrs["surplus"]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].system_attrs["fixed_params"] == {"x": 0.9}
    assert waiting[0].user_attrs == {"baseline": "x=0.9"}
    # of two trials racing for the last slot, the lower-numbered one runs
    guard(other)
    assert ran == [other.number]


def test_stop_at_total_counts_trials_running_elsewhere():
    for total, runs in ((3, 1), (5, 3)):
        study = optuna.create_study()
        study.add_trial(optuna.trial.create_trial(value=0.0))
        study.ask().set_user_attr(WORKER, identity())  # running in another (live) worker
        study.optimize(lambda t: 0.0, n_trials=10, callbacks=[StopAtTotal(total, lambda: [])])
        assert len(study.trials) == 2 + runs


def test_clean_temps_restores_a_moved_aside_export_and_removes_dead_leftovers(tmp_path):
    pid = dead_pid()
    (tmp_path / f".best.old-{pid}").mkdir()
    (tmp_path / f".best.old-{pid}" / "scores.json").write_text("{}")
    (tmp_path / f".best.tmp-{pid}").mkdir()
    (tmp_path / f".trial_3.tmp-{os.getpid()}").mkdir()  # this process's own leftover (a failed export)
    live = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / f".best.tmp-{live.pid}").mkdir()  # a live exporter's: kept
        clean_temps(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best", f".best.tmp-{live.pid}"])
        assert (tmp_path / "best" / "scores.json").exists()
    finally:
        live.kill()
        live.wait()
    (tmp_path / f".best.old-{pid}").mkdir()
    clean_temps(tmp_path)  # best exists now: a dead old-* is just removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]

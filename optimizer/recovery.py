"""Crash recovery for shared studies: who runs each trial, which RUNNING trials are orphaned, exact totals.

A worker killed with kill -9 leaves its trial RUNNING. Three mechanisms find such trials:

- every trial records its worker (host, boot id, PID, process start time) as the user attr `worker` when it
  starts; a RUNNING trial whose worker was on this host and no longer exists is dead at once;
- RDB storages (SQLite, PostgreSQL) use Optuna's heartbeat: `optuna.storages.fail_stale_trials` fails trials
  whose heartbeat is older than `storage.grace_period` (Optuna also runs it before every trial);
- the journal storage has no heartbeat in Optuna (5.0), so a thread refreshes the user attr `heartbeat`
  (unix time) every `heartbeat_interval` seconds; a trial of another host whose heartbeat is older than the
  grace period is dead. A RUNNING trial that never got a `worker` stamp (killed while its parameters were
  being sampled) is dead once it is older than the grace period.

Dead trials are failed and their parameters re-enqueued with Optuna's `RetryHeartbeatStaleTrialCallback`
(minus the dead worker's stamps), at start-up before trials are counted, and after every trial.
`StopAtTotal` and `Guard` make concurrent workers stop at exactly `n_trials` finished trials.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

WORKER = "worker"
HEARTBEAT = "heartbeat"
SURPLUS = "surplus"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_STAMPS = (WORKER, HEARTBEAT)


@lru_cache(maxsize=1)
def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # fields after "(comm)": state is [0], starttime is [19]


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), telling a reused PID from the original."""
    stat = _proc_stat(pid)
    return stat[19] if stat and len(stat) > 19 else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    return not (stat and stat[0] in ("Z", "X"))  # a killed child its parent has not reaped yet is dead


def identity() -> dict[str, Any]:
    """This worker, as recorded on each trial it runs."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "start": process_start(pid)}


def owner_dead(owner: dict[str, Any] | None, me: dict[str, Any]) -> bool:
    """True when `owner` (a trial's `worker` attr) was a process on this host that no longer runs."""
    if not isinstance(owner, dict) or owner.get("host") != me["host"]:
        return False
    if owner.get("boot") and me["boot"] and owner["boot"] != me["boot"]:
        return True  # the host rebooted since
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    if not pid_alive(pid):
        return True
    start = owner.get("start")
    return start is not None and process_start(pid) not in (None, start)  # the PID now names another process


def has_heartbeat(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def is_dead(trial: FrozenTrial, me: dict[str, Any], grace: float, optuna_heartbeat: bool,
            now: float | None = None) -> bool:
    """Whether a RUNNING trial's worker is gone (see the module docstring for the three rules)."""
    now = time.time() if now is None else now
    owner = trial.user_attrs.get(WORKER)
    if owner is None:
        start = trial.datetime_start.timestamp() if trial.datetime_start else None
        return start is not None and now - start > grace
    if owner.get("host") == me["host"]:
        return owner_dead(owner, me)
    if optuna_heartbeat:
        return False  # another host's trial: Optuna's heartbeat decides (fail_stale_trials)
    beat = trial.user_attrs.get(HEARTBEAT)
    return isinstance(beat, (int, float)) and now - beat > grace


class Requeue:
    """Optuna's RetryHeartbeatStaleTrialCallback, minus the dead worker's stamps: the retry gets the same
    parameters (or the same enqueued fixed parameters), user attrs and retry history."""

    def __init__(self, max_retry: int | None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        clean = copy.deepcopy(trial)
        clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in _STAMPS}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._retry(study, clean)


def recover(study: optuna.Study, grace: float, requeue: Callable[[optuna.Study, FrozenTrial], None]
            ) -> list[int]:
    """Fail every RUNNING trial of a dead worker and re-enqueue its parameters; returns their numbers.

    Run under the study lock (`study_lock`): failing is atomic in RDB storages, but the journal would let two
    workers fail (and re-enqueue) the same trial.
    """
    optuna_heartbeat = has_heartbeat(study)
    failed = []
    if optuna_heartbeat:
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # runs the storage's Requeue for each
        failed = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                  if t.number in before]
    me = identity()
    for t in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
        if not is_dead(t, me, grace, optuna_heartbeat):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker failed it first
        requeue(study, t)
        failed.append(t.number)
    return sorted(failed)


@contextlib.contextmanager
def study_lock(storage: optuna.storages.BaseStorage, lock_file: Any, name: str) -> Iterator[None]:
    """Serialise study set-up and recovery between workers: a lock file for workers on this machine, plus a
    PostgreSQL advisory lock (held by the connection, so freed when a worker dies) across machines."""
    from optimizer.locks import file_lock

    engine = getattr(storage, "engine", None)
    with file_lock(lock_file, "study lock"):
        if engine is None or engine.dialect.name != "postgresql":
            yield
            return
        import sqlalchemy

        with engine.connect() as conn:
            key = conn.execute(sqlalchemy.text("SELECT hashtext(:n)"),
                               {"n": f"merge-optimizer/{name}"}).scalar()
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


def count(study: optuna.Study) -> tuple[int, list[int]]:
    """(finished trials, numbers of RUNNING trials)."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    return sum(t.state in FINISHED for t in trials), running


class StopAtTotal:
    """Optuna callback: stop this worker once the finished trials plus the ones running elsewhere reach the
    total (so N workers end at exactly `n_trials`, not up to N - 1 over). Dead workers' trials found on the
    way are recovered first, so they do not hold a slot."""

    def __init__(self, n_trials: int, recover: Callable[[], object]):
        self.n_trials = n_trials
        self.recover = recover

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        finished, running = count(study)
        if finished + len(running) >= self.n_trials and running:
            self.recover()
            finished, running = count(study)
        if finished + len(running) >= self.n_trials:
            study.stop()


class Surplus(Exception):
    """A trial that started after other workers had already claimed every remaining slot."""


class Guard:
    """Wraps the objective: stamps the trial with its worker, keeps a heartbeat where Optuna has none, and
    turns a trial beyond the total into a `Surplus` failure (its enqueued parameters go back to the queue).

    Slots go by trial number: a trial runs if the finished trials plus the RUNNING trials numbered before it
    leave room, so two workers racing for the last slot agree on who gets it.
    """

    def __init__(self, objective: Callable[[optuna.Trial], Any], n_trials: int,
                 heartbeat_interval: float | None, recover: Callable[[], object]):
        self.objective = objective
        self.n_trials = n_trials
        self.heartbeat_interval = heartbeat_interval
        self.recover = recover
        self.me = identity()

    def __call__(self, trial: optuna.Trial) -> Any:
        trial.set_user_attr(WORKER, self.me)
        if self.heartbeat_interval:
            trial.set_user_attr(HEARTBEAT, time.time())
        if self._surplus(trial):
            self.recover()  # a dead worker's trial must not hold a slot
            if self._surplus(trial):
                self._give_back(trial)
                raise Surplus(f"trial {trial.number} is beyond n_trials={self.n_trials}")
        with self._heartbeat(trial):
            return self.objective(trial)

    def _surplus(self, trial: optuna.Trial) -> bool:
        trials = trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        ahead = sum(t.state in FINISHED or t.number < trial.number for t in trials)
        return ahead >= self.n_trials

    def _give_back(self, trial: optuna.Trial) -> None:
        """Mark the trial as surplus, stop this worker, and put enqueued parameters back in the queue."""
        study = trial.study
        trial.set_user_attr("fail_reason",
                            f"{SURPLUS}: other workers run the last of the {self.n_trials} trials")
        trial.set_user_attr(SURPLUS, True)
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        fixed = frozen.system_attrs.get("fixed_params")
        if fixed:
            user = {k: v for k, v in frozen.user_attrs.items() if k not in (*_STAMPS, SURPLUS, "fail_reason")}
            study.enqueue_trial(fixed, user_attrs=user)
        study.stop()

    @contextlib.contextmanager
    def _heartbeat(self, trial: optuna.Trial) -> Iterator[None]:
        if not self.heartbeat_interval:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_interval):
                with contextlib.suppress(Exception):  # a failed beat only makes the trial look older
                    trial.set_user_attr(HEARTBEAT, time.time())

        thread = threading.Thread(target=beat, name="merge-optimizer-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

"""Optuna plumbing: one sampler registry, storage by kind, study open/resume checks, trial counting."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from optimizer import UserError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _cmaes(seed: int, **kw: Any) -> optuna.samplers.BaseSampler:
    kw.setdefault("warn_independent_sampling", False)
    return optuna.samplers.CmaEsSampler(seed=seed, **kw)


# The one sampler registry: config name -> factory(seed, **kwargs).
SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed, **kw: optuna.samplers.TPESampler(seed=seed, **kw),
    "cmaes": _cmaes,
    "random": lambda seed, **kw: optuna.samplers.RandomSampler(seed=seed, **kw),
    "gp": lambda seed, **kw: optuna.samplers.GPSampler(seed=seed, **kw),
    "qmc": lambda seed, **kw: optuna.samplers.QMCSampler(seed=seed, **kw),
    "nsga2": lambda seed, **kw: optuna.samplers.NSGAIISampler(seed=seed, **kw),
}


# The one pruner registry. WilcoxonPruner compares per-item scores of a trial with the best trial's.
PRUNERS: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
    "none": lambda **kw: optuna.pruners.NopPruner(),
    "wilcoxon": lambda **kw: optuna.pruners.WilcoxonPruner(**kw),
    "median": lambda **kw: optuna.pruners.MedianPruner(**kw),
}


def build_pruner(cfg: Any) -> optuna.pruners.BasePruner:
    if cfg.name not in PRUNERS:
        raise UserError(f"pruner.name={cfg.name!r} is unknown; choose one of {sorted(PRUNERS)}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return PRUNERS[cfg.name](**dict(cfg.kwargs or {}))
    except TypeError as e:
        raise UserError(f"pruner.kwargs for {cfg.name!r} are invalid: {e}.") from None


def check_sampler(cfg: Any) -> None:
    if cfg.name not in SAMPLERS:
        raise UserError(f"sampler.name={cfg.name!r} is unknown; choose one of {sorted(SAMPLERS)}.")


def build_sampler(cfg: Any, seed: int) -> optuna.samplers.BaseSampler:
    """The configured sampler. `seed` should differ per resume so a rerun does not replay old draws."""
    check_sampler(cfg)
    try:
        return SAMPLERS[cfg.name](seed, **dict(cfg.kwargs or {}))
    except TypeError as e:
        raise UserError(f"sampler.kwargs for {cfg.name!r} are invalid: {e}.") from None


def storage_url(cfg: Any, run_dir: Path) -> str | None:
    """The URL (or journal path) a user passes to optuna-dashboard; None for in-memory storage."""
    if cfg.kind == "sqlite":
        return cfg.url or f"sqlite:///{(run_dir / 'study.db').resolve()}"
    if cfg.kind == "journal":
        return cfg.url or str((run_dir / "journal.log").resolve())
    if cfg.kind == "postgresql":
        url = cfg.url or os.environ.get(cfg.url_env)
        if not url:
            raise UserError(f"storage=postgresql needs a URL: set the environment variable {cfg.url_env} "
                            "(e.g. postgresql://user:pass@host/db) or storage.url.")
        return url
    if cfg.kind == "memory":
        return None
    raise UserError(f"storage.kind={cfg.kind!r} is unknown; use sqlite, journal, postgresql or memory.")


def build_storage(cfg: Any, run_dir: Path) -> optuna.storages.BaseStorage:
    """Storage with heartbeats for RDB kinds, so a killed worker's trial is failed and retried."""
    url = storage_url(cfg, run_dir)
    if cfg.kind == "memory":
        return optuna.storages.InMemoryStorage()
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
            optuna.storages.RetryFailedTrialCallback  # renamed in Optuna 4.9
        retry = retry_cls(max_retry=cfg.max_retry)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna but are what makes resume safe
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=cfg.heartbeat_interval,
                                          grace_period=cfg.grace_period, heartbeat_stale_trial_callback=retry)


def existing_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def check_resumable(study: optuna.Study, describe: dict[str, Any], where: str) -> None:
    """Refuse to resume a study whose search space differs (its trials would be meaningless)."""
    stored = study.user_attrs.get("space")
    if stored is None or stored == describe:
        return
    diff = [k for k in describe if stored.get(k) != describe[k]]
    raise UserError(f"study {study.study_name!r} in {where} was created with a different {', '.join(diff)} "
                    f"(stored: {', '.join(f'{k}={stored.get(k)!r}' for k in diff if k != 'params')}). "
                    "Resume it with its original settings, or choose a new study_name.")


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))

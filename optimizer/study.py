"""Optuna plumbing: one sampler registry, storage by kind, study open/resume checks, trial counting."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from optimizer import UserError
from optimizer.pruning import ItemWilcoxonPruner
from optimizer.secrets import redact_text, remember, watch_env

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _cmaes(seed: int, **kw: Any) -> optuna.samplers.BaseSampler:
    kw.setdefault("warn_independent_sampling", False)
    with warnings.catch_warnings():  # x0/sigma0: deprecated in Optuna 4.9, to be removed in 6.0 (pin optuna<6)
        warnings.filterwarnings("ignore", message=".*(x0|sigma0).*deprecated", category=FutureWarning)
        return optuna.samplers.CmaEsSampler(seed=seed, **kw)


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: `factory(seed, **kwargs)`, and `start(params)`, the extra kwargs that make it
    begin its search at a given point (CMA-ES: its mean `x0`); None: it has no such notion (TPE, GP and
    the others learn from the finished trials, baselines included, by themselves)."""

    factory: Callable[..., optuna.samplers.BaseSampler]
    start: Callable[[dict[str, float]], dict[str, Any]] | None = None


# The one sampler registry: config name -> SamplerSpec.
SAMPLERS: dict[str, SamplerSpec] = {
    "tpe": SamplerSpec(lambda seed, **kw: optuna.samplers.TPESampler(seed=seed, **kw)),
    "cmaes": SamplerSpec(_cmaes, start=lambda x0: {"x0": dict(x0)}),
    "random": SamplerSpec(lambda seed, **kw: optuna.samplers.RandomSampler(seed=seed, **kw)),
    "gp": SamplerSpec(lambda seed, **kw: optuna.samplers.GPSampler(seed=seed, **kw)),
    "qmc": SamplerSpec(lambda seed, **kw: optuna.samplers.QMCSampler(seed=seed, **kw)),
    "nsga2": SamplerSpec(lambda seed, **kw: optuna.samplers.NSGAIISampler(seed=seed, **kw)),
}


# The one pruner registry. `wilcoxon` is Optuna's WilcoxonPruner on the per-item scores a trial keeps in one
# user attr (optimizer.pruning): a paired test of its items against the best trial's.
PRUNERS: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
    "none": lambda **kw: optuna.pruners.NopPruner(),
    "wilcoxon": lambda **kw: ItemWilcoxonPruner(**kw),
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


def build_sampler(cfg: Any, seed: int, *, start: dict[str, float] | None = None,
                  **overrides: Any) -> optuna.samplers.BaseSampler:
    """The configured sampler. `seed` should differ per resume so a rerun does not replay old draws.

    Args:
        cfg: the `sampler` config node (`name`, `kwargs`).
        seed: its random seed.
        start: parameter values to start the search at (a warm start; ignored by samplers without one).
        overrides: kwargs laid over `cfg.kwargs` (e.g. a stage's own `sigma0`).
    """
    check_sampler(cfg)
    spec = SAMPLERS[cfg.name]
    kwargs = {**dict(cfg.kwargs or {}), **overrides}
    if start is not None and spec.start is not None:
        kwargs.update(spec.start(start))
    try:
        return spec.factory(seed, **kwargs)
    except TypeError as e:
        raise UserError(f"sampler.kwargs for {cfg.name!r} are invalid: {e}.") from None


def storage_url(cfg: Any, run_dir: Path) -> str | None:
    """The URL (or journal path) a user passes to optuna-dashboard; None for in-memory storage.

    PostgreSQL URLs come from the environment variable `storage.url_env` (preferred: nothing written holds
    the password) or `storage.url`; `postgresql://` gets the installed driver (psycopg2, else psycopg 3).
    """
    if cfg.kind == "sqlite":
        url = cfg.url or f"sqlite:///{(run_dir / 'study.db').resolve()}"
        if not url.startswith("sqlite:///"):
            raise UserError(f"storage.url={redact_text(url)!r} is not an SQLite URL "
                            "(sqlite:///path/study.db); for a server use storage=postgresql.")
        return url
    if cfg.kind == "journal":
        return cfg.url or str((run_dir / "journal.log").resolve())
    if cfg.kind == "postgresql":
        watch_env(cfg.url_env)
        url = cfg.url or os.environ.get(cfg.url_env or "")
        if not url:
            raise UserError(f"storage=postgresql needs a URL: set the environment variable {cfg.url_env} "
                            "(e.g. postgresql://user:pass@host/db) or storage.url.")
        remember(url)
        return with_driver(url)
    if cfg.kind == "memory":
        return None
    raise UserError(f"storage.kind={cfg.kind!r} is unknown; use sqlite, journal, postgresql or memory.")


def url_source(cfg: Any) -> str:
    """How messages name the storage: the environment variable when the URL came from it."""
    if cfg.kind == "postgresql" and not cfg.url:
        return f"${cfg.url_env}"
    return "storage.url"


def with_driver(url: str) -> str:
    """A PostgreSQL URL with a driver SQLAlchemy can load (UserError naming the extra if none is installed)."""
    from importlib.util import find_spec

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise UserError(f"storage=postgresql: {redact_text(url)!r} is not a PostgreSQL URL; write "
                        "postgresql://user:password@host:5432/database (the password preferably in the "
                        "environment variable storage.url_env names).")
    driver = scheme.partition("+")[2]
    module = {"": None, "psycopg": "psycopg", "psycopg2": "psycopg2"}.get(driver, driver)
    if module is None:
        module = "psycopg2" if find_spec("psycopg2") else "psycopg"
        driver = module
    if not find_spec(module):
        raise UserError(f"storage=postgresql needs a PostgreSQL driver for SQLAlchemy, and {module} is not "
                        "installed: pip install 'merge-optimizer[postgresql]' (psycopg 3), then rerun.")
    return f"postgresql+{driver}://{rest}"


def grace_seconds(cfg: Any) -> int:
    """How long a RUNNING trial may go without a heartbeat before its worker counts as dead."""
    return int(cfg.grace_period or 3 * cfg.heartbeat_interval)


def build_storage(cfg: Any, run_dir: Path) -> optuna.storages.BaseStorage:
    """The study's storage. RDB kinds get Optuna's heartbeat, so a killed worker's trial is failed and its
    parameters re-enqueued (see optimizer.recovery); errors opening it are UserErrors naming the URL."""
    import sqlalchemy.exc

    from optimizer.locks import file_lock
    from optimizer.recovery import Requeue

    url = storage_url(cfg, run_dir)
    if cfg.kind == "memory":
        return optuna.storages.InMemoryStorage()
    if cfg.heartbeat_interval is None or cfg.heartbeat_interval < 1:
        raise UserError(f"storage.heartbeat_interval={cfg.heartbeat_interval!r} must be a positive number of "
                        "seconds (a dead worker is found after storage.grace_period, default 3 intervals).")
    if cfg.grace_period is not None and cfg.grace_period <= cfg.heartbeat_interval:
        raise UserError(f"storage.grace_period={cfg.grace_period} must exceed storage.heartbeat_interval="
                        f"{cfg.heartbeat_interval} (or be null: 3 intervals), else live trials look dead.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.kind == "journal":
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url))
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        for attempt in range(5):
            # Workers creating a fresh database at once race on its schema (alembic_version): the lock orders
            # the ones on this machine, the retry covers other machines (the loser then finds the tables).
            try:
                with file_lock(run_dir / ".study.lock", "study lock"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat args
                    return optuna.storages.RDBStorage(
                        url, engine_kwargs=engine, heartbeat_interval=cfg.heartbeat_interval,
                        grace_period=grace_seconds(cfg),
                        heartbeat_stale_trial_callback=Requeue(cfg.max_retry))
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                if attempt == 4:
                    raise
                time.sleep(0.5 + attempt)
    except UserError:
        raise
    except Exception as e:  # bad URL, unreachable server, wrong password, read-only or full disk, ...
        first = redact_text(str(e).strip().splitlines()[0] if str(e).strip() else "")
        shown = redact_text(url)
        raise UserError(f"cannot open the study storage {shown!r} ({url_source(cfg)}; storage={cfg.kind}): "
                        f"{type(e).__name__}: {first}. Check the URL, that the server is up and the "
                        "credentials are right, or that the folder is writable.") from None


def existing_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def stored_study(cfg: Any, run_dir: Path, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """The existing study `cfg.study_name` in `cfg.storage` (for export and report); UserError if absent."""
    study = existing_study(storage or build_storage(cfg.storage, run_dir), cfg.study_name)
    if study is None:
        raise UserError(f"no study {cfg.study_name!r} in {storage_url(cfg.storage, run_dir)}; check study_name, "
                        "run_root and storage.")
    return study


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

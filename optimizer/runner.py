"""The study loop: open or resume the study, enqueue baselines, run it to `n_trials`, export the best.

Validation, loading and scoring live in `optimizer.session`; writing models in `optimizer.export`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import time
import warnings
from collections.abc import Callable

import optuna
import sqlalchemy.exc
from omegaconf import DictConfig, OmegaConf

from optimizer import UserError
from optimizer.artifacts import artifact_store, attach
from optimizer.eval import SEARCH, EvaluationFailed
from optimizer.export.write import clean_temps, export_best, export_lock, export_pareto, is_current
from optimizer.fingerprint import ATTR as FINGERPRINT
from optimizer.fingerprint import check as check_fingerprint
from optimizer.fingerprint import fingerprint
from optimizer.fingerprint import stored_version as stored_fingerprint
from optimizer.progress import Progress, print_run_end
from optimizer.pruning import ITEMS, ItemWilcoxonPruner
from optimizer.recovery import Guard, Requeue, StopAtTotal, Surplus, count, has_heartbeat, recover, study_lock
from optimizer.search.loop import run_search
from optimizer.secrets import has_password, redact, redact_text
from optimizer.session import Session, console, load, prepare, score
from optimizer.study import (
    FINISHED,
    build_pruner,
    build_sampler,
    build_storage,
    check_resumable,
    count_finished,
    existing_study,
    grace_seconds,
    storage_url,
)


class ItemReporter:
    """Collects a trial's item scores (fixed order per study) and asks the pruner every `chunk_size` items.

    For the Wilcoxon pruner the item scores stay in memory and the pruner is asked directly
    (`ItemWilcoxonPruner.prune_items`): no storage write or read per check. They are written once when the
    trial finishes or is stopped (`flush`, one user attr, `optimizer.pruning.ITEMS`): later trials compare
    with a finished one's.
    Every other pruner (median, percentile, ...) reads a learning curve: it gets the running mean as the
    intermediate value (step = items scored) through `trial.report` / `trial.should_prune`.
    """

    def __init__(self, s: Session, trial: optuna.Trial):
        self.trial = trial
        self.every = max(int(s.evaluator.chunk_size), 1)
        pruner = trial.study.pruner
        self.items_pruner = pruner if isinstance(pruner, ItemWilcoxonPruner) else None
        self.items: list[float] = []
        self.written = 0
        self.timings = s.timings
        self.started = time.perf_counter()

    def __call__(self, task: str, index: int, value: float) -> None:
        self.items.append(float(value))
        n = len(self.items)
        if n % self.every:
            return
        if self.items_pruner is not None:
            prune = self.items_pruner.prune_items(self.trial.study, self.trial.number, self.items)
        else:
            self.trial.report(sum(self.items) / n, n)
            prune = self.trial.should_prune()
        if prune:
            self.flush()  # what the stopped trial scored, for the dashboard and the report
            self.timings["pruned_at"].append(n)
            self.trial.set_user_attr("pruned_after_items", n)
            self.trial.set_user_attr("eval_seconds", time.perf_counter() - self.started)
            raise optuna.TrialPruned(f"pruned after {n} items")

    def flush(self) -> None:
        """Write the trial's item scores so far (the Wilcoxon pruner compares later trials with a finished
        trial's)."""
        if self.items_pruner is not None and len(self.items) > self.written:
            self.trial.set_user_attr(ITEMS, self.items)
            self.written = len(self.items)


def item_reporter(s: Session, trial: optuna.Trial) -> ItemReporter | None:
    """The per-item callback of a pruned study (None without a pruner)."""
    return None if s.cfg.pruner.name == "none" else ItemReporter(s, trial)


def make_objective(s: Session, store: optuna.artifacts.FileSystemArtifactStore
                   ) -> Callable[[optuna.Trial], float | list[float]]:
    def objective(trial: optuna.Trial) -> float | list[float]:
        plan = s.space.plan(s.space.suggest(trial))
        try:
            reporter = item_reporter(s, trial)
            scores = score(s, plan, SEARCH, trial=trial.number, on_item=reporter)
        except EvaluationFailed as e:
            trial.set_user_attr("fail_reason", str(e))
            for k, v in e.info.items():
                trial.set_user_attr(k, v)
            attach(store, trial, plan, None, s, extra=e.artifacts)
            raise
        if reporter is not None:
            reporter.flush()
        s.timings["merge"].append(scores.info["merge_seconds"])
        s.timings["eval"].append(scores.info["eval_seconds"])
        trial.set_user_attr("scores", scores.tasks)
        for k, v in scores.info.items():
            trial.set_user_attr(k, v)
        attach(store, trial, plan, scores, s)
        return s.objective.value(scores)

    return objective


def check_study(s: Session) -> tuple[optuna.storages.BaseStorage, dict]:
    """Open the storage and check the stored study's identity, before any model is loaded: a bad URL, a
    missing driver or a study defined differently is a UserError (exit 2) and nothing is added."""
    cfg = s.cfg
    storage = build_storage(cfg.storage, s.run_dir)
    current = fingerprint(s)
    study = existing_study(storage, cfg.study_name)
    if study is not None:
        where = redact_text(storage_url(cfg.storage, s.run_dir) or "memory")
        if not check_fingerprint(study, current, where):  # created before fingerprints (of this format)
            check_resumable(study, s.space.describe(), where)
    return storage, current


def open_study(s: Session, storage: optuna.storages.BaseStorage, current: dict) -> optuna.Study:
    """Create or resume the study: under the study lock, the creator stores its identity; then trials of dead
    workers are failed and re-enqueued and baselines that never finished are enqueued (again)."""
    cfg = s.cfg
    lock = (contextlib.nullcontext() if cfg.storage.kind == "memory"
            else study_lock(storage, s.run_dir / ".study.lock", cfg.study_name))
    with lock:
        try:
            optuna.create_study(study_name=cfg.study_name, storage=storage, **s.objective.directions_kwargs())
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            created = False
        done = count_finished(optuna.load_study(study_name=cfg.study_name, storage=storage))
        sampler = build_sampler(cfg.sampler, cfg.seed + done)  # a resumed run must not replay its first draws
        study = optuna.create_study(study_name=cfg.study_name, storage=storage, sampler=sampler,
                                    pruner=build_pruner(cfg.pruner), load_if_exists=True,
                                    **s.objective.directions_kwargs())
        if created or stored_fingerprint(study) is None:
            study.set_user_attr(FINGERPRINT, current)
        if "space" not in study.user_attrs:
            study.set_user_attr("space", s.space.describe())
            study.set_user_attr("seed", cfg.seed)
            s.objective.label(study)
        recovered = recover(study, grace_seconds(cfg.storage), Requeue(cfg.storage.max_retry))
        enqueue_baselines(s, study)
        study.set_user_attr("config", redact(OmegaConf.to_container(cfg, resolve=True)))
    if recovered:
        numbers = ", ".join(f"#{n}" for n in recovered)
        console.print(f"[yellow]{len(recovered)} trial(s) left RUNNING by a dead worker ({numbers}): failed, "
                      "their parameters re-enqueued[/]")
    return study


def enqueue_baselines(s: Session, study: optuna.Study) -> None:
    """Baselines run first so the search cannot end worse than the classic recipes. Idempotent: a baseline
    is enqueued unless a trial of it finished, waits or runs (a crashed one was re-enqueued by `recover`)."""
    have = {t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False, states=(
        *FINISHED, optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING))}
    for b in s.cfg.merge.baselines:
        params = s.space.baseline(b)
        out = [p for p in s.space.params if not p.low <= params[p.name] <= p.high]
        label = ",".join(f"{k}={v}" for k, v in b.items())
        if out:
            console.print(f"[yellow]baseline {label} skipped: {out[0].name} outside bounds "
                          f"[{out[0].low}, {out[0].high}][/]")
            continue
        if label not in have:
            study.enqueue_trial(params, user_attrs={"baseline": label})


def run(cfg: DictConfig) -> int:
    """Run or resume the study named by `cfg.study_name`; returns the process exit code."""
    logging.getLogger("optuna").setLevel(logging.WARNING)
    for noisy in ("httpx", "httpx2", "openai", "anthropic"):  # one INFO line per judge request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = prepare(cfg)
    try:
        return _run(s)
    except (OSError, sqlalchemy.exc.OperationalError) as e:
        if not disk_trouble(e):
            raise
        why = redact_text(str(e).splitlines()[0])
        raise UserError(f"cannot write under run_root={cfg.run_root!r}: {why}. "
                        "Free some space or point run_root at a writable folder, then rerun the same command "
                        "to resume.") from None
    finally:
        s.evaluator.close()


def print_comparison(s: Session) -> None:
    """The bottom line of the export: exported trial vs best baseline vs best expert vs base, and the gain."""
    from rich.markup import escape

    from optimizer.export.heldout import comparison_lines

    try:
        comp = json.loads((s.run_dir / "best" / "scores.json").read_text(encoding="utf-8"))["comparison"]
    except (OSError, ValueError, KeyError):
        return
    for line in comparison_lines(comp):
        console.print(escape(line))


def disk_trouble(e: BaseException) -> bool:
    """A full or read-only disk (as the OS or SQLite reports it)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM)
    text = str(e).lower()
    return "disk is full" in text or "readonly database" in text or "disk i/o error" in text


def _run(s: Session) -> int:
    cfg = s.cfg
    storage, current = check_study(s)  # before loading: storage and resume errors cost nothing
    if cfg.storage.url and has_password(cfg.storage.url):
        console.print("[yellow]storage.url holds a password; it is redacted in everything written, but "
                      f"prefer the environment variable {cfg.storage.url_env}[/]")
    load(s)
    study = open_study(s, storage, current)
    for parent in (s.run_dir, s.run_dir / "pareto"):
        clean_temps(parent)  # what killed exports left (live exporters' folders are kept)
    done = count_finished(study)
    console.print(f"study {cfg.study_name!r}: {done} finished trials, target {cfg.n_trials}")
    progress = Progress(s, cfg.n_trials, console, done=done)
    interrupted = False
    finished, running = count(study)
    ran = finished + len(running) < cfg.n_trials
    if ran:
        def recover_now() -> list[int]:
            with study_lock(storage, s.run_dir / ".study.lock", cfg.study_name):
                return recover(study, grace_seconds(cfg.storage), Requeue(cfg.storage.max_retry))

        own_heartbeat = (None if has_heartbeat(study) or cfg.storage.kind == "memory"
                         else cfg.storage.heartbeat_interval)  # the journal: Optuna has no heartbeat there
        try:
            def optimize(stage_objective: Callable[[optuna.Trial], float | list[float]], target: int) -> None:
                guarded = Guard(stage_objective, target, own_heartbeat, recover_now)
                study.optimize(guarded, catch=(EvaluationFailed, Surplus),
                               callbacks=[StopAtTotal(target, recover_now), progress], gc_after_trial=False)

            run_search(s, study, make_objective(s, artifact_store(s.run_dir)), optimize,
                       stopped=lambda: progress.aborted is not None, say=console.print)
        except KeyboardInterrupt:
            interrupted = True
            console.print("[yellow]interrupted[/]")
    if progress.aborted:
        raise UserError(progress.aborted)
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        console.print("[red]no completed trial: nothing to export[/]")
        return 130 if interrupted else 1
    if cfg.export.enabled:
        with export_lock(s.run_dir):  # one exporter at a time; the last one sees every finished trial
            if s.objective.multi:
                console.print(f"Pareto front written to {export_pareto(s, study)}")
            elif not is_current(s.run_dir / "best", study):
                console.print(f"best model written to {export_best(s, study)}")
            else:
                console.print(f"best model is current: {s.run_dir / 'best'}")
    console.print(json.dumps(s.objective.summary(study), indent=None))
    if cfg.export.enabled and not s.objective.multi:
        print_comparison(s)
    print_run_end(s, console)  # held-out score, scores.json, report and dashboard commands
    return 130 if interrupted else 0

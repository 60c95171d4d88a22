"""The study loop: open or resume the study, enqueue baselines, run it to `n_trials`, export the best.

Validation, loading and scoring live in `optimizer.session`; writing models in `optimizer.export`.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable

import optuna
from omegaconf import DictConfig, OmegaConf

from optimizer import UserError
from optimizer.artifacts import artifact_store, attach
from optimizer.eval import SEARCH, EvaluationFailed
from optimizer.export.write import export_best, export_pareto, is_current
from optimizer.progress import Progress
from optimizer.session import Session, console, load, prepare, score
from optimizer.study import (
    FINISHED,
    build_pruner,
    build_sampler,
    build_storage,
    check_resumable,
    count_finished,
    existing_study,
    storage_url,
)


def item_reporter(s: Session, trial: optuna.Trial) -> Callable[[str, int, float], None] | None:
    """Report each scored item as one step (fixed order per study) and prune once per chunk."""
    if s.cfg.pruner.name == "none":
        return None
    every = max(int(s.evaluator.chunk_size), 1)
    step = 0
    started = time.perf_counter()

    def on_item(task: str, index: int, value: float) -> None:
        nonlocal step
        trial.report(float(value), step)
        step += 1
        if step % every == 0 and trial.should_prune():
            s.timings["pruned_at"].append(step)
            trial.set_user_attr("pruned_after_items", step)
            trial.set_user_attr("eval_seconds", time.perf_counter() - started)
            raise optuna.TrialPruned(f"pruned after {step} items")

    return on_item


def make_objective(s: Session, store: optuna.artifacts.FileSystemArtifactStore
                   ) -> Callable[[optuna.Trial], float | list[float]]:
    def objective(trial: optuna.Trial) -> float | list[float]:
        plan = s.space.plan(s.space.suggest(trial))
        try:
            scores = score(s, plan, SEARCH, trial=trial.number, on_item=item_reporter(s, trial))
        except EvaluationFailed as e:
            trial.set_user_attr("fail_reason", str(e))
            for k, v in e.info.items():
                trial.set_user_attr(k, v)
            attach(store, trial, plan, None, s, extra=e.artifacts)
            raise
        s.timings["merge"].append(scores.info["merge_seconds"])
        s.timings["eval"].append(scores.info["eval_seconds"])
        trial.set_user_attr("scores", scores.tasks)
        for k, v in scores.info.items():
            trial.set_user_attr(k, v)
        attach(store, trial, plan, scores, s)
        return s.objective.value(scores)

    return objective


def open_study(s: Session) -> optuna.Study:
    cfg = s.cfg
    storage = build_storage(cfg.storage, s.run_dir)
    where = storage_url(cfg.storage, s.run_dir) or "memory"
    study = existing_study(storage, cfg.study_name)
    if study is not None:
        check_resumable(study, s.space.describe(), where)
    done = count_finished(study) if study else 0
    sampler = build_sampler(cfg.sampler, cfg.seed + done)  # a resumed run must not replay its first draws
    study = optuna.create_study(study_name=cfg.study_name, storage=storage, sampler=sampler,
                                pruner=build_pruner(cfg.pruner), load_if_exists=True, **s.objective.directions_kwargs())
    if "space" not in study.user_attrs:
        study.set_user_attr("space", s.space.describe())
        study.set_user_attr("seed", cfg.seed)
        s.objective.label(study)
        enqueue_baselines(s, study)
    study.set_user_attr("config", OmegaConf.to_container(cfg, resolve=True))
    return study


def enqueue_baselines(s: Session, study: optuna.Study) -> None:
    """Baselines run first so the search cannot end worse than the classic recipes."""
    for b in s.cfg.merge.baselines:
        params = s.space.baseline(b)
        out = [p for p in s.space.params if not p.low <= params[p.name] <= p.high]
        label = ",".join(f"{k}={v}" for k, v in b.items())
        if out:
            console.print(f"[yellow]baseline {label} skipped: {out[0].name} outside bounds "
                          f"[{out[0].low}, {out[0].high}][/]")
            continue
        study.enqueue_trial(params, user_attrs={"baseline": label}, skip_if_exists=True)


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
    finally:
        s.evaluator.close()


def _run(s: Session) -> int:
    cfg = s.cfg
    load(s)
    study = open_study(s)
    done = count_finished(study)
    console.print(f"study {cfg.study_name!r}: {done} finished trials, target {cfg.n_trials}")
    progress = Progress(s, cfg.n_trials, console)
    interrupted = False
    ran = done < cfg.n_trials
    if ran:
        try:
            study.optimize(make_objective(s, artifact_store(s.run_dir)), catch=(EvaluationFailed,),
                           callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=FINISHED), progress],
                           gc_after_trial=False)
        except KeyboardInterrupt:
            interrupted = True
            console.print("[yellow]interrupted[/]")
    if progress.aborted:
        raise UserError(progress.aborted)
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        console.print("[red]no completed trial: nothing to export[/]")
        return 130 if interrupted else 1
    if cfg.export.enabled and s.objective.multi:
        console.print(f"Pareto front written to {export_pareto(s, study)}")
    elif cfg.export.enabled:
        if ran or not is_current(s.run_dir / "best", study):
            console.print(f"best model written to {export_best(s, study)}")
        else:
            console.print(f"best model is current: {s.run_dir / 'best'}")
    console.print(json.dumps(s.objective.summary(study), indent=None))
    url = storage_url(cfg.storage, s.run_dir)
    if url:
        console.print(f"dashboard: optuna-dashboard {url} --artifact-dir {(s.run_dir / 'artifacts').resolve()}")
    return 130 if interrupted else 0

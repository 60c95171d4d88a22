"""The search loop: validate everything, load once, run the study to `n_trials`, export the best."""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from omegaconf import OmegaConf
from rich.console import Console

from optimizer import UserError
from optimizer.eval import SEARCH, EvaluationFailed, build_evaluator
from optimizer.merge.registry import METHODS
from optimizer.models import ModelSet, pick_device
from optimizer.objective import Objective
from optimizer.space import SearchSpace, derive_layout
from optimizer.study import (
    FINISHED,
    build_pruner,
    build_sampler,
    build_storage,
    check_resumable,
    check_sampler,
    count_finished,
    existing_study,
    storage_url,
)

console = Console(highlight=False, soft_wrap=True)


@dataclass
class Session:
    """Everything a run builds, in the order it is built (validation first, loading last)."""

    cfg: Any
    run_dir: Path
    device: Any
    models: ModelSet
    space: SearchSpace
    evaluator: Any
    objective: Objective
    moe: Any = None
    live: Any = None
    tokenizer: Any = None
    applier: Any = None
    resident: Any = None
    dense: Any = None  # (model, applier) of the dense models, for references when the live model is an MoE
    timings: dict[str, list[float]] = field(default_factory=lambda: {"merge": [], "eval": [], "pruned_at": []})


def prepare(cfg: Any) -> Session:
    """Check the whole configuration against the models' headers; nothing heavy is loaded, nothing written."""
    if cfg.n_trials < 1:
        raise UserError(f"n_trials={cfg.n_trials}: the study needs at least one trial.")
    if cfg.merge.method not in METHODS:
        raise UserError(f"merge.method={cfg.merge.method!r} is unknown; choose one of {sorted(METHODS)}.")
    method = METHODS[cfg.merge.method]
    check_sampler(cfg.sampler)
    device = pick_device(cfg.device)
    moe = None
    if cfg.moe is not None:
        from optimizer.moe.config import load_moe_config

        moe = load_moe_config(cfg.moe)
        if cfg.models.target:
            raise UserError("moe= is set together with models.target; an MoE takes its shared tensors from "
                            "moe.base_model, so drop models.target.")
        # The MoE recipe names the models: its base and experts replace the `models` group.
        cfg.models.base = moe.base_model
        cfg.models.models = {e.name: e.source_model for e in moe.experts}
        if moe.dtype != "auto":
            cfg.models.dtype = moe.dtype
    models = ModelSet(cfg.models)
    set_threads(cfg.threads, device, models)
    n = len(models.names)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        raise UserError(f"merge.method={method.name!r} takes {method.min_models}..{method.max_models or 'any'} "
                        f"models besides the base, got {n}: {list(models.names)}.")
    if cfg.models.target and not method.uses_base:
        raise UserError(f"models.target is set, but {method.name!r} is not a task-vector method; "
                        "drop models.target or use task_arithmetic/ties/dare_*.")
    names = models.tensor_names
    if moe is not None:
        from optimizer.moe.search import live_tensor_names

        names = live_tensor_names(moe, names)  # tensors that never reach the MoE's output are not searched
    space = SearchSpace(method, models.names, derive_layout(names, cfg.mode.granularity), cfg.merge)
    run_dir = Path(cfg.run_root) / cfg.study_name
    context = {"device": device, "run_dir": run_dir, "seed": cfg.seed, "cfg": cfg}
    evaluator = build_evaluator(cfg.evaluator, context)
    evaluator.validate()
    objective = Objective.from_config(cfg.objective, evaluator)
    build_pruner(cfg.pruner)
    if cfg.pruner.name != "none":
        if objective.multi:
            raise UserError(f"pruner={cfg.pruner.name} works on single-objective studies only; use pruner=none "
                            "with several objectives.")
        if getattr(getattr(evaluator, "cfg", None), "chunk_size", 1) <= 0:
            raise UserError(f"pruner={cfg.pruner.name} needs per-item reports: set evaluator.chunk_size "
                            "(e.g. 25) so items are scored and reported in chunks.")
    for b in cfg.merge.baselines:
        space.baseline(b)
    return Session(cfg, run_dir, device, models, space, evaluator, objective, moe=moe)


def set_threads(threads: int | None, device: Any, models: ModelSet) -> None:
    """CPU threads for torch. Auto (None): one thread for small models on CPU, where thread hand-offs
    cost more than the math (the demo zoo evaluates ~5x faster on 1 thread than on 2)."""
    if threads:
        torch.set_num_threads(int(threads))
    elif device.type == "cpu":
        params = sum(math.prod(i.shape) for i in models.infos.values())
        if params < 50_000_000:
            torch.set_num_threads(1)


def load(s: Session) -> None:
    """Load the resident tensors and the live model once (the expensive part)."""
    from rich.progress import Progress

    from optimizer.merge.apply import Applier

    names = s.models.tensor_names
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"loading {len(s.models.names)} task vectors to {s.device}", total=len(names))
        resident = s.models.load_resident(s.device, progress=lambda _: bar.advance(task))
    s.tokenizer = s.models.load_tokenizer()
    if s.moe is None:
        s.live = s.models.load_live(s.device)
        s.applier = Applier(s.live, resident)
    else:
        from transformers import AutoConfig

        from optimizer.moe.search import MoeApplier, build_live_moe

        base_config = AutoConfig.from_pretrained(str(s.models.base.path))
        s.live = build_live_moe(s.moe, base_config, resident.anchor, resident.deltas, s.tokenizer,
                                dtype=s.models.dtype, device=s.device)
        s.applier = MoeApplier(s.live, resident, s.moe, s.tokenizer)
    s.resident = resident
    console.print(f"resident: {resident.nbytes() / 2**20:.1f} MiB on {s.device}; "
                  f"search space: {len(s.space)} parameters ({s.space.layout.granularity}, "
                  f"{len(s.space.layout.units)} units x {len(s.models.names)} models)")


def dense_reference(s: Session) -> tuple[Any, Any]:
    """(model, applier) that can write the base or one expert alone: the live model, or for an MoE a dense
    model loaded on first use (references compare the MoE with the dense experts it was built from)."""
    if s.moe is None:
        return s.live, s.applier
    if s.dense is None:
        from optimizer.merge.apply import Applier

        model = s.models.load_live(s.device)
        s.dense = (model, Applier(model, s.resident))
    return s.dense


def evaluate_plan(s: Session, plan: Any, split: str, trial_number: int = 0, on_item: Any = None) -> Any:
    """Materialise `plan` in the live model and score it on `split`; records merge/eval seconds."""
    t0 = time.perf_counter()
    s.applier.apply(plan, seed=s.cfg.seed, trial=trial_number)
    t1 = time.perf_counter()
    scores = s.evaluator.evaluate(s.live, s.tokenizer, split, on_item=on_item)
    t2 = time.perf_counter()
    scores.info.setdefault("merge_seconds", t1 - t0)
    scores.info["eval_seconds"] = t2 - t1
    return scores


def item_reporter(s: Session, trial: optuna.Trial) -> Any:
    """Report each scored item as one step (fixed order per study) and prune once per chunk."""
    if s.cfg.pruner.name == "none":
        return None
    every = max(int(getattr(s.evaluator.cfg, "chunk_size", 1)), 1)
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


def make_objective(s: Session, store: Any) -> Any:
    from optimizer.artifacts import attach

    def objective(trial: optuna.Trial) -> Any:
        plan = s.space.plan(s.space.suggest(trial))
        try:
            scores = evaluate_plan(s, plan, SEARCH, trial.number, on_item=item_reporter(s, trial))
        except EvaluationFailed as e:
            trial.set_user_attr("fail_reason", str(e))
            for k, v in getattr(e, "info", {}).items():
                trial.set_user_attr(k, v)
            attach(store, trial, plan, None, s, extra=getattr(e, "artifacts", {}))
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


def run(cfg: Any) -> int:
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
        close = getattr(s.evaluator, "close", None)
        if close is not None:
            close()


def _run(s: Session) -> int:
    cfg = s.cfg
    load(s)
    study = open_study(s)
    from optimizer.artifacts import artifact_store
    from optimizer.progress import Progress

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
        from optimizer.export import export_pareto

        console.print(f"Pareto front written to {export_pareto(s, study)}")
    elif cfg.export.enabled:
        from optimizer.export import export_best, is_current

        if ran or not is_current(s.run_dir / "best", study):
            console.print(f"best model written to {export_best(s, study)}")
        else:
            console.print(f"best model is current: {s.run_dir / 'best'}")
    console.print(json.dumps(s.objective.summary(study), indent=None))
    url = storage_url(cfg.storage, s.run_dir)
    if url:
        console.print(f"dashboard: optuna-dashboard {url} --artifact-dir {(s.run_dir / 'artifacts').resolve()}")
    return 130 if interrupted else 0

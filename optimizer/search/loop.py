"""Run a study through its stage schedule: baselines, then each stage with a sampler built when it starts.

Baselines are enqueued trials; they run first, under a sampler that draws nothing. Every later stage's
sampler is built when the stage starts, from what the study holds then (a warm start begins at the best
finished trial, recorded on the study so a resumed run rebuilds the same sampler), and every trial records
its stage (`stage` user attr).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from optimizer.search import schedule as sch
from optimizer.search.coarse import ProjectedSampler, coarse_groups, project
from optimizer.study import build_sampler, count_finished

STAGE_ATTR = "stage"
NOTES_ATTR = "search_notes"
# Defaults of the sampler of a coarse stage: a handful of values, so model them after a few draws.
COARSE_KWARGS = {"gp": {"n_startup_trials": 3, "deterministic_objective": True}, "tpe": {"n_startup_trials": 4}}


def plan_for(s: Any, study: optuna.Study, say: Callable[[str], None] = print) -> list[sch.Stage]:
    """The study's recorded plan (made and recorded now if it has none), grown to `n_trials`."""
    plan = sch.recorded_plan(study)
    if plan is None:
        stages = list(s.cfg.search.stages)
        sch.check_stages(stages)
        notes = []
        if s.objective.multi and stages:
            notes.append("several objectives: stages need one trial value; one stage with the configured "
                         "sampler runs instead")
            stages = []
        kept = []
        for st in stages:
            reason = refine_blocker(s) if st.kind == "refine" else None
            if reason:
                notes.append(f"stage {st.name!r} (refine) skipped: {reason}")
            else:
                kept.append(st)
        n_base = len({t.user_attrs["baseline"] for t in study.get_trials(deepcopy=False) if "baseline" in t.user_attrs})
        plan = sch.make_plan(kept, n_base, s.cfg.n_trials)
        sch.record_plan(study, plan)
        if notes:
            study.set_user_attr(NOTES_ATTR, notes)
        for n in notes:
            say(n)
    return sch.extended(plan, s.cfg.n_trials)


def refine_blocker(s: Any) -> str | None:
    """Why this session cannot run a refine stage (None: it can)."""
    from optimizer.search.refine import MergeGraph, NotRefinable

    if s.moe is not None:
        return "the live model is an MoE (refinement writes dense merges)"
    if getattr(s.evaluator, "name", None) != "lm_eval":
        return f"evaluator {s.evaluator.name!r} has no gold answers (refinement needs an lm-eval evaluator)"
    if s.resident is None:
        return None  # checked again with the tensors when the stage starts
    try:
        MergeGraph(s.space, s.resident, s.space.baseline({}), check_only=True)
    except NotRefinable as e:
        return str(e)
    return None


def stage_sampler(s: Any, stage: sch.Stage, start: dict[str, float] | None, seed: int
                  ) -> optuna.samplers.BaseSampler:
    """The sampler of a sample stage: a coarse ProjectedSampler, or the study's sampler (warm-started)."""
    if stage.coarse is not None:
        name = stage.sampler or "gp"
        inner_cfg = OmegaConf.create({"name": name, "kwargs": {**COARSE_KWARGS.get(name, {}), **(stage.kwargs or {})}})
        return ProjectedSampler(s.space, coarse_groups(s.space, stage.coarse),
                                lambda sd: build_sampler(inner_cfg, sd), seed)
    cfg = s.cfg.sampler
    if stage.sampler is not None and stage.sampler != cfg.name:
        cfg = OmegaConf.create({"name": stage.sampler, "kwargs": {}})
    overrides = dict(stage.kwargs or {})
    if stage.sigma0 is not None and cfg.name == "cmaes":
        overrides["sigma0"] = stage.sigma0
    return build_sampler(cfg, seed, start=start if s.cfg.search.warm_start else None, **overrides)


def tagged(objective: Callable[[optuna.Trial], Any], name: str) -> Callable[[optuna.Trial], Any]:
    def run(trial: optuna.Trial) -> Any:
        if STAGE_ATTR not in trial.user_attrs:
            trial.set_user_attr(STAGE_ATTR, name)
        return objective(trial)

    return run


def run_search(s: Any, study: optuna.Study, objective: Callable[[optuna.Trial], Any],
               optimize: Callable[[Callable[[optuna.Trial], Any], int], None], *,
               stopped: Callable[[], bool] = lambda: False, say: Callable[[str], None] = print) -> None:
    """Run `study` stage by stage until it has `s.cfg.n_trials` finished trials (or `stopped()`).

    Args:
        s: the loaded session.
        study: the opened study (baselines enqueued).
        objective: the trial objective (scores one trial).
        optimize: `optimize(objective, target)` runs trials of `study` with its current sampler until the
            study has `target` finished trials (the runner's `study.optimize` with its callbacks).
        stopped: true once the runner wants no more trials (too many failures).
        say: console output.
    """
    plan = plan_for(s, study, say)
    n_trials = s.cfg.n_trials
    while not stopped():
        done = count_finished(study)
        stage = sch.stage_of(plan, done) if done < n_trials else None
        if stage is None:
            return
        target = min(stage.end, n_trials)
        if stage.kind == "baselines":
            study.sampler = optuna.samplers.RandomSampler(seed=s.cfg.seed + done)  # enqueued: draws nothing
        elif stage.kind == "refine":
            reason = enqueue_refined(s, study, stage, say)
            if reason:  # its trial goes to the next stage
                say(f"stage {stage.name!r} (refine) skipped: {reason}")
                study.set_user_attr(NOTES_ATTR, [*study.user_attrs.get(NOTES_ATTR, []),
                                                 f"stage {stage.name!r} (refine) skipped: {reason}"])
                plan = sch.collapse(plan, stage.name)
                sch.record_plan(study, plan)
                continue
            study.sampler = optuna.samplers.RandomSampler(seed=s.cfg.seed + done)
        else:
            start = stage_start(study, stage)
            if stage.coarse is not None and start is not None and project(coarse_groups(s.space, stage.coarse),
                                                                          start) is None:
                # coarse to fine: the best trial is already finer than this stage's groups (e.g. refined)
                note = (f"stage {stage.name!r} (coarse: {stage.coarse}) skipped: the best trial so far "
                        f"(#{sch.start_of(study, stage)}) is finer than its groups; the next stage takes its trials")
                say(note)
                study.set_user_attr(NOTES_ATTR, [*study.user_attrs.get(NOTES_ATTR, []), note])
                plan = sch.collapse(plan, stage.name)
                sch.record_plan(study, plan)
                continue
            study.sampler = stage_sampler(s, stage, start, s.cfg.seed + done)
        optimize(tagged(objective, stage.name), target)
        if count_finished(study) == done and not wait_for_others(study):
            return  # nothing finished and nobody else is running trials: do not spin


def wait_for_others(study: optuna.Study, seconds: float = 600.0, poll: float = 2.0) -> bool:
    """At a stage boundary other workers may hold the stage's last trials: wait (up to `seconds`) until one
    of them finishes so the next stage starts from it. False when no trial is running."""
    finished = count_finished(study)
    waited = 0.0
    while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) and waited < seconds:
        time.sleep(poll)
        waited += poll
        if count_finished(study) > finished:
            return True
    return False


def stage_start(study: optuna.Study, stage: sch.Stage) -> dict[str, float] | None:
    """Parameters of the trial the stage starts from: recorded at its first start (the best so far)."""
    number = sch.start_of(study, stage)
    if number is None:
        best = sch.best_complete(study)
        if best is None:
            return None
        number = best.number
        sch.record_start(study, stage, number)
    trial = study.get_trials(deepcopy=False)[number]
    return dict(trial.params)


def enqueue_refined(s: Any, study: optuna.Study, stage: sch.Stage, say: Callable[[str], None]) -> str | None:
    """Refine the stage's start trial by gradient and enqueue the result (once: a resumed run that finds
    it waiting, running or finished reuses it). Returns why it could not, or None."""
    import torch

    from optimizer.search.gold import evaluator_gold
    from optimizer.search.refine import NotRefinable, refine

    states = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
    if any(t.user_attrs.get(STAGE_ATTR) == stage.name for t in study.get_trials(deepcopy=False, states=states)):
        return None
    reason = refine_blocker(s)
    start = stage_start(study, stage)
    if reason or start is None:
        return reason or "no completed trial to start from"
    rc = s.cfg.search.refine
    origin = sch.start_of(study, stage)
    try:
        gold = evaluator_gold(s.evaluator, s.tokenizer, limit=rc.limit)
        result = refine(s.space, s.resident, s.live, start, gold, steps=rc.steps, lr=rc.lr,
                        batch_items=rc.batch_items, loss=rc.loss, temperature=rc.temperature, seed=s.cfg.seed,
                        micro_items=rc.micro_items)
    except (NotRefinable, torch.OutOfMemoryError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    info = result.summary()
    say(f"refined trial {origin} by gradient ({info['steps']} Adam steps, {rc.loss} on {len(gold.items)} "
        f"search items): loss {info['loss_start']:.4f} -> {info['loss_end']:.4f} in {info['seconds']:.1f}s")
    study.enqueue_trial(result.params, user_attrs={STAGE_ATTR: stage.name, "refined_from": origin,
                                                   "refine": info})
    return None

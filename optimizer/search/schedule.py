"""The stage schedule of a study: which stage each finished-trial count belongs to, recorded on the study.

A study's plan is fixed when it is created (study user attr `search_plan`: name, kind, coarse, sampler,
sigma0 and the finished-trial count at which each stage ends), so a resumed study keeps its stage
boundaries whatever `n_trials` the rerun asks for; only the last stage grows (or the study stops early)
when `n_trials` changes. Each stage's start point is recorded when the stage starts (`search_starts`), so
a rebuilt sampler starts where the first one did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import optuna
from optuna.trial import TrialState

from optimizer import UserError
from optimizer.search.coarse import COARSE

PLAN_ATTR = "search_plan"
STARTS_ATTR = "search_starts"
KINDS = ("baselines", "sample", "refine")


@dataclass(frozen=True)
class Stage:
    """One stage of a recorded plan; it runs until the study has `end` finished trials."""

    name: str
    kind: str
    end: int
    coarse: str | None = None
    sampler: str | None = None
    sigma0: float | None = None
    kwargs: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_stages(stages: Sequence[Any]) -> None:
    """UserError for a schedule that cannot run (before any model is loaded)."""
    names = set()
    for i, st in enumerate(stages):
        where = f"search.stages[{i}]"
        if st.kind not in ("sample", "refine"):
            raise UserError(f"{where}.kind={st.kind!r} is unknown; use sample or refine.")
        if st.name in names or st.name == "baselines":
            raise UserError(f"{where}.name={st.name!r} is used twice (or is the reserved name 'baselines'); "
                            "give each stage its own name.")
        names.add(st.name)
        if st.coarse is not None and st.coarse not in COARSE:
            raise UserError(f"{where}.coarse={st.coarse!r} is unknown; use one of {list(COARSE)} or null.")
        if st.kind == "sample" and st.trials < 0:
            raise UserError(f"{where}.trials={st.trials} must be >= 0 (a share < 1 or a count).")
        if st.coarse is not None and st.sampler == "cmaes":
            raise UserError(f"{where}: a coarse stage redraws from its finished trials each time, which CMA-ES "
                            "cannot; use sampler gp, tpe, random or qmc there.")


def make_plan(stages: Sequence[Any], n_baselines: int, n_trials: int) -> list[Stage]:
    """Stage ends for a budget of `n_trials` finished trials, `n_baselines` of them baselines.

    Sample stages get `trials` (a share of the trials after the baselines if < 1, else a count); the last
    sample stage takes whatever is left; refine stages take one trial each. With no stages: one sample
    stage named `search`.
    """
    plan = [Stage("baselines", "baselines", n_baselines)] if n_baselines else []
    rest = max(n_trials - n_baselines, 0)
    specs = list(stages) or [_Default()]
    last = max((i for i, st in enumerate(specs) if st.kind == "sample"), default=None)
    end = n_baselines
    for i, st in enumerate(specs):
        if st.kind == "refine":
            size = 1
        elif i == last:
            size = max(n_trials - end - sum(1 for s in specs[i + 1:] if s.kind == "refine"), 0)
        else:
            size = int(round(st.trials * rest)) if st.trials < 1 else int(st.trials)
        end += size
        plan.append(Stage(st.name, st.kind, end, st.coarse, st.sampler, st.sigma0, dict(st.kwargs or {})))
    return plan


class _Default:
    name, kind, coarse, sampler, sigma0, trials, kwargs = "search", "sample", None, None, None, 1.0, None


def recorded_plan(study: optuna.Study) -> list[Stage] | None:
    raw = study.user_attrs.get(PLAN_ATTR)
    return [Stage(**d) for d in raw] if raw else None


def record_plan(study: optuna.Study, plan: Sequence[Stage]) -> None:
    study.set_user_attr(PLAN_ATTR, [st.to_dict() for st in plan])


def extended(plan: Sequence[Stage], n_trials: int) -> list[Stage]:
    """The recorded plan with its last sample stage (and what follows it) grown to reach `n_trials`."""
    plan = list(plan)
    grow = n_trials - plan[-1].end if plan else 0
    if grow <= 0:
        return plan
    last = max((i for i, st in enumerate(plan) if st.kind == "sample"), default=None)
    if last is None:
        return plan
    return [st if i < last else replace(st, end=st.end + grow) for i, st in enumerate(plan)]


def collapse(plan: Sequence[Stage], name: str) -> list[Stage]:
    """The plan with stage `name` made empty (it ends where the one before it ends): the next stage takes
    its trials. Used when a refine stage cannot run."""
    out, prev = [], 0
    for st in plan:
        out.append(replace(st, end=prev) if st.name == name else st)
        prev = out[-1].end
    return out


def stage_of(plan: Sequence[Stage], finished: int) -> Stage | None:
    """The stage the next trial belongs to when the study has `finished` finished trials."""
    return next((st for st in plan if finished < st.end), None)


def start_of(study: optuna.Study, stage: Stage) -> int | None:
    """The trial a stage starts from, recorded when it first started (None before)."""
    return study.user_attrs.get(STARTS_ATTR, {}).get(stage.name)


def record_start(study: optuna.Study, stage: Stage, trial_number: int) -> None:
    starts = dict(study.user_attrs.get(STARTS_ATTR, {}))
    starts[stage.name] = trial_number
    study.set_user_attr(STARTS_ATTR, starts)


def best_complete(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial by search value (ties: the earliest), or None (also for several objectives)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done or len(study.directions) > 1:
        return None
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return min(done, key=lambda t: (sign * t.value, t.number))

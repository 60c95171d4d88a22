"""Trial values from Scores: a weighted mean of task metrics, or several such objectives (Pareto)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from optimizer import UserError
from optimizer.eval.base import Scores


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective: `sum(w * task score) / sum(w)` over the named tasks."""

    name: str
    weights: Mapping[str, float]
    direction: str = "maximize"

    def value(self, scores: Scores) -> float:
        missing = [t for t in self.weights if t not in scores.tasks]
        if missing:
            raise UserError(f"objective {self.name!r} weights task {missing[0]!r}, which the evaluator does "
                            f"not report; it reports {sorted(scores.tasks)}.")
        total = sum(self.weights.values())
        return sum(w * scores.tasks[t] for t, w in self.weights.items()) / total


class Objective:
    """The study's objective(s). Default: one objective, the evaluator's task weights (equal if none)."""

    def __init__(self, specs: list[ObjectiveSpec]):
        self.specs = specs

    @classmethod
    def from_config(cls, node: Any, evaluator: Any) -> Objective:
        default = dict(evaluator.weights)
        if node is None:
            if not default:
                raise UserError("the evaluator declares no task weights; set objective.objectives.")
            return cls([ObjectiveSpec("score", default)])
        raw = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        specs = []
        for i, o in enumerate(raw.get("objectives") or []):
            weights = o.get("weights") or default
            if not weights or sum(weights.values()) <= 0:
                raise UserError(f"objective.objectives[{i}].weights must be positive task weights.")
            direction = o.get("direction", "maximize")
            if direction not in ("maximize", "minimize"):
                raise UserError(f"objective.objectives[{i}].direction={direction!r}: use maximize or minimize.")
            specs.append(ObjectiveSpec(o.get("name", f"objective_{i}"), weights, direction))
        if not specs:
            return cls([ObjectiveSpec("score", default)])
        unknown = [t for s in specs for t in s.weights if default and t not in default]
        if unknown:
            raise UserError(f"objective weights name task {unknown[0]!r}, not one of the evaluator's tasks "
                            f"{sorted(default)}.")
        return cls(specs)

    @property
    def multi(self) -> bool:
        return len(self.specs) > 1

    def value(self, scores: Scores) -> float | list[float]:
        vals = [s.value(scores) for s in self.specs]
        return vals if self.multi else vals[0]

    def directions_kwargs(self) -> dict[str, Any]:
        if self.multi:
            return {"directions": [s.direction for s in self.specs]}
        return {"direction": self.specs[0].direction}

    def label(self, study: Any) -> None:
        """Name the objectives on the study so the dashboard labels them."""
        study.set_metric_names([s.name for s in self.specs])

    def summary(self, study: Any) -> dict[str, Any]:
        if self.multi:
            return {"pareto_front": [t.number for t in study.best_trials]}
        best = study.best_trial
        return {"best_trial": best.number, self.specs[0].name: best.value}

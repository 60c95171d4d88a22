"""MergePlan: the per-tensor coefficients of one merge, as frozen, serialisable data.

A plan is what a trial decides and what a recipe states. Values are mergekit-style rule lists: for each
parameter (per model, or global) an ordered list of (filter, value); the first rule whose filter is a
substring of the tensor name wins, and a rule without filter matches every tensor. A plan is written as a
mergekit recipe by ``optimizer.merge.recipe.plan_doc``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Rules = tuple[tuple[str | None, float], ...]


def first_match(rules: Rules, tensor_name: str, what: str) -> float:
    for flt, value in rules:
        if flt is None or flt in tensor_name:
            return value
    raise KeyError(f"no rule of {what} matches tensor {tensor_name!r}")


@dataclass(frozen=True)
class MergePlan:
    """Everything needed to materialise one merge, given the resident tensors.

    Args:
        method: merge method name (registry key).
        models: model names in task-vector order.
        model_params: param -> model -> rules (e.g. weight, density).
        global_params: param -> rules (e.g. t, lambda).
        options: non-numeric method options (e.g. {"rescale": "l1"}), passed through to the kernel.
    """

    method: str
    models: tuple[str, ...]
    model_params: Mapping[str, Mapping[str, Rules]] = field(default_factory=dict)
    global_params: Mapping[str, Rules] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def resolve(self, tensor_name: str) -> tuple[dict[str, list[float]], dict[str, Any]]:
        """Per-model and global parameter values for one tensor."""
        mp = {p: [first_match(by_model[m], tensor_name, f"{p}/{m}") for m in self.models]
              for p, by_model in self.model_params.items()}
        gp: dict[str, Any] = {p: first_match(r, tensor_name, p) for p, r in self.global_params.items()}
        gp.update(self.options)
        return mp, gp

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "models": list(self.models),
            "model_params": {p: {m: [_rule_out(r) for r in rules] for m, rules in by.items()}
                             for p, by in self.model_params.items()},
            "global_params": {p: [_rule_out(r) for r in rules] for p, rules in self.global_params.items()},
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MergePlan:
        return cls(
            method=d["method"],
            models=tuple(d["models"]),
            model_params={p: {m: tuple(_rule_in(r) for r in rules) for m, rules in by.items()}
                          for p, by in d.get("model_params", {}).items()},
            global_params={p: tuple(_rule_in(r) for r in rules)
                           for p, rules in d.get("global_params", {}).items()},
            options=dict(d.get("options", {})),
        )


def constant(value: float) -> Rules:
    return ((None, float(value)),)


def _rule_out(rule: tuple[str | None, float]) -> dict[str, Any]:
    flt, value = rule
    return {"value": value} if flt is None else {"filter": flt, "value": value}


def _rule_in(d: Mapping[str, Any]) -> tuple[str | None, float]:
    return (d.get("filter"), float(d["value"]))

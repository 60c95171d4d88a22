"""Evaluator registry: one map from config name to factory. Evaluator modules register themselves."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from optimizer import UserError
from optimizer.eval.base import HELDOUT, SEARCH, EvaluationFailed, Evaluator, Scores

__all__ = ["EVALUATORS", "register_evaluator", "build_evaluator", "Evaluator", "Scores", "EvaluationFailed",
           "SEARCH", "HELDOUT"]

# name -> factory(cfg, context) -> Evaluator. `context` carries run-wide facts (device, run_dir, seed).
EVALUATORS: dict[str, Callable[..., Evaluator]] = {}

# Modules that register evaluators when imported; importing lazily keeps heavy deps (lm-eval, SDKs) optional.
_PLUGIN_MODULES = ("optimizer.eval.lm_eval", "optimizer.eval.composite", "optimizer.eval.judge")


def register_evaluator(name: str) -> Callable:
    """Class/function decorator: `@register_evaluator("lm_eval")`."""

    def deco(factory: Callable[..., Evaluator]) -> Callable[..., Evaluator]:
        if name in EVALUATORS and EVALUATORS[name] is not factory:
            raise ValueError(f"evaluator {name!r} registered twice")
        EVALUATORS[name] = factory
        return factory

    return deco


def load_plugins() -> None:
    for mod in _PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a plug-in whose optional dependency is missing stays unregistered
            if not (e.name or "").startswith("optimizer"):
                continue
            raise


def build_evaluator(cfg: Any, context: dict[str, Any]) -> Evaluator:
    """Build the evaluator named by `cfg.name` (raises UserError listing the known names)."""
    load_plugins()
    if isinstance(cfg, dict):
        from omegaconf import OmegaConf

        cfg = OmegaConf.create(cfg)
    name = cfg.get("name") if cfg is not None else None
    if name not in EVALUATORS:
        raise UserError(f"evaluator.name={name!r} is not a known evaluator; choose one of {sorted(EVALUATORS)}.")
    return EVALUATORS[name](cfg, context)

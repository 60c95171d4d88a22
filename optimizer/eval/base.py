"""The evaluator protocol every scorer (lm-eval, LLM judge, ...) implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

SEARCH = "search"
HELDOUT = "heldout"
SPLITS = (SEARCH, HELDOUT)


class EvaluationFailed(RuntimeError):
    """Raised by an evaluator when a trial cannot be scored honestly (the trial is marked FAIL).

    `info` and `artifacts` (as in Scores) are still recorded on the failed trial, so it stays auditable.
    """

    def __init__(self, reason: str, *, info: dict[str, Any] | None = None, artifacts: dict[str, str] | None = None):
        super().__init__(reason)
        self.info = dict(info or {})
        self.artifacts = dict(artifacts or {})


@dataclass
class Scores:
    """What one evaluation of one model on one split produced.

    Args:
        tasks: primary metric per task, e.g. {"zoo_add": 0.62}; the objective is built from these.
        metrics: every metric reported, keyed "task/metric".
        items: optional per-item scores per task (fixed order), used for per-item pruning.
        info: counters worth recording on the trial (tokens, cost, failures, seconds).
        artifacts: file name -> text content to attach to the trial (answers, judgments).
    """

    tasks: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)
    items: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)

    def mean(self) -> float:
        return sum(self.tasks.values()) / max(len(self.tasks), 1)


@runtime_checkable
class Evaluator(Protocol):
    """Scores a live model. Built once per run; `evaluate` is called once per trial (and for baselines).

    Every member is required: the runner calls them directly (no probing), and
    `tests/eval/test_evaluator_conformance.py` checks each registered evaluator against this list.

    Attributes:
        name: the registry name (`evaluator.name`).
        weights: task name -> weight of the default objective (the weighted mean of the task scores).
        chunk_size: items per chunk when per-item reports are asked for (`on_item`); 0 = the evaluator
            reports no items, so a per-item pruner cannot be used with it.
    """

    name: str

    @property
    def weights(self) -> dict[str, float]: ...

    @property
    def chunk_size(self) -> int: ...

    def splits(self) -> tuple[str, ...]:
        """The splits this evaluator can score: ("search",) or ("search", "heldout")."""

    def validate(self) -> None:
        """Check the configuration (task names, keys, files) and raise UserError before any trial."""

    def evaluate(self, model: Any, tokenizer: Any, split: str, *, on_item: Callable | None = None) -> Scores:
        """Score `model` on `split` ("search" or "heldout").

        `on_item(task, index, score)` may be called per scored item so a pruner can stop early; it may
        raise optuna.TrialPruned.
        """

    def close(self) -> None:
        """Release what the evaluator holds (servers, caches, threads); called once when the run ends."""

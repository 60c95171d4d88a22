"""Continuous per-item search signals computed from the responses lm-eval's accuracy is computed from.

Accuracy moves in steps of 1/items; two merges that differ a little often tie. A search metric scores the
same requests (no extra forward pass) on a continuous scale that rises with the gold answer's likelihood, so
it orders such merges and gives a per-item pruner real differences to test. Set `search_metric` on a task (or
evaluator-wide) to use it as the trial value on the search split; accuracy stays the reported metric.

    margin   multiple_choice: log-lik of the gold choice minus the best wrong choice's (> 0 iff acc = 1)
             loglikelihood:   the gold continuation's log-likelihood per token (<= 0; 0 = certain)
    prob     multiple_choice: softmax over the choices' log-liks, the gold's share (in [0, 1])
             loglikelihood:   exp(log-likelihood per token), the geometric-mean token probability (in [0, 1])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from optimizer.eval.engine import ItemResult, PreparedTask

OUTPUT_TYPES = ("multiple_choice", "loglikelihood")


@dataclass(frozen=True)
class SearchMetric:
    """A per-item value from (log-likelihood per choice and gold choices) or (log-lik, continuation tokens)."""

    name: str
    choice: Callable[[Sequence[float], Sequence[int]], float]
    continuation: Callable[[float, int], float]
    help: str


SEARCH_METRICS: dict[str, SearchMetric] = {}


def register_search_metric(metric: SearchMetric) -> SearchMetric:
    if metric.name in SEARCH_METRICS:
        raise ValueError(f"search metric {metric.name!r} registered twice")
    SEARCH_METRICS[metric.name] = metric
    return metric


def _margin(lls: Sequence[float], gold: Sequence[int]) -> float:
    good = [lls[g] for g in gold]
    bad = [x for i, x in enumerate(lls) if i not in gold]
    if not good:  # no valid gold label (lm-eval scores the item 0): as wrong as the choices' spread
        return min(lls) - max(lls)
    return max(good) - max(bad) if bad else 0.0


def _prob(lls: Sequence[float], gold: Sequence[int]) -> float:
    top = max(lls)
    exp = [math.exp(x - top) for x in lls]
    return sum(exp[g] for g in gold) / sum(exp)


register_search_metric(SearchMetric(
    "margin", _margin, lambda ll, n: ll / max(n, 1),
    "multiple choice: gold log-lik minus the best wrong choice's; loglikelihood: gold log-lik per token"))
register_search_metric(SearchMetric(
    "prob", _prob, lambda ll, n: math.exp(ll / max(n, 1)),
    "multiple choice: the gold's softmax share over the choices; loglikelihood: exp(log-lik per token)"))


def check(name: str, task: str, output_type: str, where: str) -> None:
    """Raise UserError unless `name` is a registered metric that applies to a task of `output_type`."""
    from optimizer import UserError

    if name not in SEARCH_METRICS:
        raise UserError(f"{where}={name!r} is not a search metric; choose one of {sorted(SEARCH_METRICS)} "
                        "or null (accuracy).")
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"{where}={name!r}: task {task!r} is a {output_type} task; search metrics need the "
                        f"log-likelihoods of {' or '.join(OUTPUT_TYPES)} tasks. Set it to null for this task.")


def item_value(name: str, prepared: PreparedTask, result: ItemResult) -> float:
    """The metric `name` of one scored item (its responses as the engine returned them)."""
    metric = SEARCH_METRICS[name]
    kind = prepared.output_type
    if kind == "loglikelihood":
        (ll, _greedy), n = result.responses[0][0], result.tokens[0]
        if n is None:
            raise ValueError(f"task {prepared.name!r}: continuation token count unknown for this LM")
        return float(metric.continuation(float(ll), int(n)))
    if kind != "multiple_choice":
        raise ValueError(f"task {prepared.name!r}: no search metric for output_type {kind!r}")
    lls = [float(r[0][0]) for r in result.responses]
    key = ("gold", result.doc_id)
    if key not in prepared.memo:  # labels do not change between trials; templates cost ~1 ms a render
        prepared.memo[key] = gold_choices(prepared.task, result.doc)
    choices, gold = prepared.memo[key]
    return float(metric.choice(lls[:len(choices)], gold))  # mutual-info tasks append unconditional lls


def gold_choices(task: Any, doc: Any) -> tuple[list[str], list[int]]:
    """(choices, indices of the right ones) of a multiple-choice doc, resolved as lm-eval's
    `ConfigurableTask.process_results` resolves them (int label, choice string, or a list of labels)."""
    choices = list(task.doc_to_choice(doc))
    gold = task.doc_to_text(doc) if getattr(task, "multiple_input", 0) else task.doc_to_target(doc)
    labels = gold if isinstance(gold, list) else [gold]
    out = []
    for g in labels:
        if isinstance(g, str):
            g = choices.index(g) if g in choices else -1
        if isinstance(g, int) and 0 <= g < len(choices):
            out.append(g)
    return choices, out

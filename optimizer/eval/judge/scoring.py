"""From judgment records to the trial's score: failed judgments are excluded and counted, never scored."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from optimizer.eval.base import EvaluationFailed
from optimizer.eval.judge.bench import Question
from optimizer.eval.judge.prompts import RATING_MAX, RATING_MIN

TASK = "mt_bench"


@dataclass
class Judgment:
    """One judgment record (a line of judgments.jsonl). `score` is the rating after the language penalty."""

    question_id: Any
    category: str
    turn: int
    judgment_index: int
    judge: str
    prompt: str
    score: float | None
    raw_score: float | None
    language_mismatch: bool
    cached: bool
    error: str | None
    judgment: str | None
    user_prompt: str
    tokens_in: int = 0
    tokens_out: int = 0


def penalised(rating: float | None, mismatch: bool, penalty: float) -> float | None:
    """`rating` lowered by the language penalty (never below the scale's minimum)."""
    if rating is None or not mismatch or penalty <= 0:
        return rating
    return max(RATING_MIN, rating * (1.0 - penalty))


def turn_means(records: list[Judgment]) -> dict[tuple[str, int], list[float]]:
    """Successful scores per (question id, turn)."""
    out: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in records:
        if r.score is not None:
            out[(str(r.question_id), r.turn)].append(r.score)
    return out


def question_score(records: list[Judgment]) -> float:
    """Mean over turns of the mean successful score per turn, normalised to [0, 1]; NaN if none succeeded."""
    means = [statistics.fmean(v) for v in turn_means(records).values()]
    return statistics.fmean(means) / RATING_MAX if means else math.nan


def summarise(questions: list[Question], records: list[Judgment], max_failed_share: float) -> dict[str, Any]:
    """Aggregate the records of one evaluation.

    The headline is FastChat's: the mean over all (question, turn) ratings, here divided by 10 so that
    higher-is-better lies in [0, 1]. Each (question, turn) first averages its repeated judgments.

    Args:
        questions: the split's questions, in order (defines the order of per-item scores).
        records: every judgment requested, failed ones included.
        max_failed_share: above this share of failed judgments the trial is not scored.
    Returns:
        dict with tasks, metrics, items and info entries for Scores.
    Raises:
        EvaluationFailed: too many failed judgments, or none succeeded.
    """
    failed = [r for r in records if r.score is None]
    share = len(failed) / max(len(records), 1)
    per_turn = turn_means(records)
    if share > max_failed_share or not per_turn:
        reasons = defaultdict(int)
        for r in failed:
            reasons[r.error or "?"] += 1
        top = ", ".join(f"{n}x {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1])[:3])
        raise EvaluationFailed(f"{len(failed)}/{len(records)} judgments failed ({share:.0%} > "
                               f"evaluator.max_failed_share={max_failed_share:.0%}): {top}")
    means = {k: statistics.fmean(v) for k, v in per_turn.items()}
    cat_of = {q.qid: q.category for q in questions}
    metrics = {f"{TASK}/rating": statistics.fmean(means.values()), f"{TASK}/failed_share": share,
               f"{TASK}/language_mismatch_share": sum(r.language_mismatch for r in records) / len(records)}
    for label, keep in [*((f"turn{t}", lambda k, t=t: k[1] == t) for t in (1, 2)),
                        *((c, lambda k, c=c: cat_of[k[0]] == c) for c in sorted(set(cat_of.values())))]:
        vals = [m for k, m in means.items() if keep(k)]
        if vals:
            metrics[f"{TASK}/{label}"] = statistics.fmean(vals) / RATING_MAX
    by_q: dict[str, list[Judgment]] = defaultdict(list)
    for r in records:
        by_q[str(r.question_id)].append(r)
    spreads = [statistics.pstdev(v) for v in per_turn.values() if len(v) > 1]
    info = {"judge_failures": len(failed), "judge_failed_share": share, "judgments_total": len(records)}
    if spreads:
        info["judge_noise_std"] = statistics.fmean(spreads)
    return {"tasks": {TASK: metrics[f"{TASK}/rating"] / RATING_MAX}, "metrics": metrics,
            "items": {TASK: [question_score(by_q[q.qid]) for q in questions]}, "info": info}

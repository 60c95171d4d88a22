"""Honest numbers after a search: references, baselines, held-out re-evaluation of the top-k, noise.

Every held-out evaluation is cached on the study (user attrs), so a rerun or a later export pays once.
"""

from __future__ import annotations

from typing import Any

import optuna

from optimizer.eval.base import HELDOUT, SEARCH, Scores
from optimizer.session import Session, score, score_single

COMPLETE = (optuna.trial.TrialState.COMPLETE,)


def value_of(trial: optuna.trial.FrozenTrial) -> Any:
    values = trial.values or []
    return values[0] if len(values) == 1 else values


def entry(s: Session, scores: Scores) -> dict[str, Any]:
    return {"tasks": scores.tasks, "objective": s.objective.value(scores)}


def evaluate_trial(s: Session, trial: optuna.trial.FrozenTrial, split: str,
                   seed: int | None = None) -> dict[str, Any]:
    """Re-materialise a trial's merge (same seeds unless `seed` is given) and score it on `split`."""
    return entry(s, score(s, s.space.plan(trial.params), split, trial=trial.number, seed=seed))


def heldout_of(s: Session, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial's held-out score, evaluated once and cached on the study."""
    cached: dict[str, Any] = dict(study.user_attrs.get("heldout", {}))
    key = str(trial.number)
    if key not in cached:
        cached[key] = evaluate_trial(s, trial, HELDOUT)
        study.set_user_attr("heldout", cached)
    return cached[key]


def reference_scores(s: Session, study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The anchor (base or target) and each fine-tune alone, per split; cached on the study."""
    cached: dict[str, Any] = dict(study.user_attrs.get("references", {}))
    anchor = "target" if s.cfg.models.target else "base"
    for idx, name in [(None, anchor), *enumerate(s.models.names)]:
        for split in s.splits:
            key = f"{name}/{split}"
            if key not in cached:
                cached[key] = entry(s, score_single(s, idx, split))
    study.set_user_attr("references", cached)
    out: dict[str, dict[str, Any]] = {}
    for key, v in cached.items():
        name, split = key.rsplit("/", 1)
        out.setdefault(name, {})[split] = v
    return out


def baseline_scores(s: Session, study: optuna.Study) -> dict[str, dict[str, Any]]:
    """Each completed baseline trial's search score and held-out score."""
    out: dict[str, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False, states=COMPLETE):
        label = t.user_attrs.get("baseline")
        if not label or label in out:
            continue
        out[label] = {"trial": t.number, SEARCH: {"tasks": t.user_attrs.get("scores", {}), "objective": value_of(t)}}
        if HELDOUT in s.splits:
            out[label][HELDOUT] = heldout_of(s, study, t)
    return out


def heldout_table(s: Session, study: optuna.Study, k: int) -> list[dict[str, Any]]:
    """Top-k trials by search score, re-evaluated on the held-out split, with both ranks and the gap.

    A large rank change or search-vs-held-out gap is the sign of a search that overfits its items.
    """
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    top = sorted(study.get_trials(deepcopy=False, states=COMPLETE), key=lambda t: (sign * t.value, t.number))[:k]
    rows = [{"trial": t.number, "search": t.value, "heldout": heldout_of(s, study, t)["objective"],
             "search_rank": i + 1} for i, t in enumerate(top)]
    for i, r in enumerate(sorted(rows, key=lambda r: (sign * r["heldout"], r["search_rank"]))):
        r["heldout_rank"] = i + 1
        r["rank_change"] = r["search_rank"] - r["heldout_rank"]
        r["gap"] = r["search"] - r["heldout"]
    return rows


def choose(s: Session, study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, list[dict[str, Any]]]:
    """The trial to export: the best held-out score among the top-k by search score (when held-out exists)."""
    k = s.cfg.export.heldout_top_k
    if not (s.cfg.export.heldout and HELDOUT in s.splits and k > 0):
        return study.best_trial, []
    table = heldout_table(s, study, k)
    best = min(table, key=lambda r: r["heldout_rank"])
    return next(t for t in study.get_trials(deepcopy=False) if t.number == best["trial"]), table


def noise(s: Session, trial: optuna.trial.FrozenTrial, repeats: int) -> dict[str, Any]:
    """Evaluate a trial `repeats` times, re-drawing every seeded random choice of the merge.

    DARE/DELLA masks take a new seed each repeat; deterministic methods and evaluators give sd = 0, which is
    itself the answer: differences between trials are then not noise of the evaluation.
    """
    split = HELDOUT if HELDOUT in s.splits else SEARCH
    values = [evaluate_trial(s, trial, split, seed=s.cfg.seed + 1000 * (r + 1))["objective"]
              for r in range(repeats)]
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
    sources = ["merge masks"] if s.space.method.stochastic else []
    return {"split": split, "values": values, "mean": mean, "sd": sd, "random_sources": sources}

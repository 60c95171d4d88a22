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
    """The top-k trials by search score and every finished baseline, re-evaluated on the held-out split,
    with both ranks (over these rows), the gap and each row's baseline label ("" for searched trials).

    A large rank change or search-vs-held-out gap is the sign of a search that overfits its items.
    """
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    ranked = sorted(study.get_trials(deepcopy=False, states=COMPLETE), key=lambda t: (sign * t.value, t.number))
    rank = {t.number: i + 1 for i, t in enumerate(ranked)}
    rows_of = {t.number: t for t in ranked[:k]}
    for t in first_baselines(study).values():
        rows_of.setdefault(t.number, t)
    rows = [{"trial": t.number, "baseline": t.user_attrs.get("baseline", ""), "search": t.value,
             "heldout": heldout_of(s, study, t)["objective"], "search_rank": rank[t.number]}
            for t in sorted(rows_of.values(), key=lambda t: rank[t.number])]
    # held-out ties go to a baseline: a searched trial is chosen only if it is strictly better
    for i, r in enumerate(sorted(rows, key=lambda r: (sign * r["heldout"], not r["baseline"], r["search_rank"]))):
        r["heldout_rank"] = i + 1
        r["rank_change"] = r["search_rank"] - r["heldout_rank"]
        r["gap"] = r["search"] - r["heldout"]
    return rows


def first_baselines(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """Label -> the first completed trial of each baseline."""
    out: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=COMPLETE):
        label = t.user_attrs.get("baseline")
        if label and label not in out:
            out[label] = t
    return out


def choose(s: Session, study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, list[dict[str, Any]]]:
    """The trial to export: the best held-out score among the top-k by search score and every baseline
    (when held-out exists). If no searched trial is strictly better than the best baseline on held-out,
    the export is that baseline."""
    k = s.cfg.export.heldout_top_k
    if not (s.cfg.export.heldout and HELDOUT in s.splits and k > 0):
        return study.best_trial, []
    table = heldout_table(s, study, k)
    best = min(table, key=lambda r: r["heldout_rank"])
    return next(t for t in study.get_trials(deepcopy=False) if t.number == best["trial"]), table


def comparison(doc: dict[str, Any]) -> dict[str, Any]:
    """The run's bottom line from an export's scores: the exported trial against the best baseline, the
    best expert and the base, on search and held-out, with the gains (held-out when there is one)."""
    split = HELDOUT if HELDOUT in doc["best"] else SEARCH

    def row(what: str, name: str, entry: dict[str, Any]) -> dict[str, Any]:
        return {"what": what, "name": name, SEARCH: _objective(entry.get(SEARCH)),
                HELDOUT: _objective(entry.get(HELDOUT))}

    best = doc["best"]
    label = ""
    baselines = doc.get("baselines") or {}
    for name, b in baselines.items():
        if b.get("trial") == best["trial"]:
            label = name
    rows = [row("exported", f"trial {best['trial']}" + (f" (baseline {label})" if label else ""), best)]
    if baselines:
        top = max(baselines, key=lambda n: _objective(baselines[n].get(split)) or float("-inf"))
        rows.append(row("best baseline", f"{top} (trial {baselines[top]['trial']})", baselines[top]))
    refs = doc.get("references") or {}
    anchor = "target" if "target" in refs else "base"
    experts = {n: v for n, v in refs.items() if n not in ("base", "target")}
    if experts:
        top = max(experts, key=lambda n: _objective(experts[n].get(split)) or float("-inf"))
        rows.append(row("best expert", top, experts[top]))
    if anchor in refs:
        rows.append(row(anchor, anchor, refs[anchor]))
    mine = rows[0][split]
    gains = {f"vs {r['what']}": (mine - r[split]) if mine is not None and r[split] is not None else None
             for r in rows[1:]}
    return {"split": split, "rows": rows, "gain": gains, "baseline_wins": bool(label)}


def _objective(entry: dict[str, Any] | None) -> float | None:
    value = (entry or {}).get("objective")
    return float(value) if isinstance(value, (int, float)) else None


def comparison_lines(comp: dict[str, Any]) -> list[str]:
    """The comparison as a plain-text table plus one sentence saying who won."""
    lines = [f"{'':15} {'':34} {'search':>8} {'held-out':>9}"]
    for r in comp["rows"]:
        cells = [f"{r[k]:.4f}" if r[k] is not None else "-" for k in (SEARCH, HELDOUT)]
        lines.append(f"{r['what']:15} {r['name'][:34]:34} {cells[0]:>8} {cells[1]:>9}")
    gains = ", ".join(f"{k} {v:+.4f}" for k, v in comp["gain"].items() if v is not None)
    split = "held-out" if comp["split"] == HELDOUT else "search"
    lines.append(f"gain ({split}): {gains}")
    if comp["baseline_wins"]:
        lines.append(f"No searched trial beat the best baseline on the {split} split: the export IS that "
                     "baseline (more trials, another sampler or search= schedule may find a better merge).")
    return lines


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

"""Write chosen trials as loadable HF model folders with their recipe and an honest score table."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import optuna

from optimizer.artifacts import dump_recipe, recipe_doc
from optimizer.eval.base import HELDOUT, SEARCH
from optimizer.export.heldout import baseline_scores, choose, heldout_of, noise, reference_scores, value_of
from optimizer.session import Session, score


def export_best(s: Session, study: optuna.Study, trial: optuna.trial.FrozenTrial | None = None,
                dest: Path | None = None) -> Path:
    """Score references, baselines and the top-k on held-out, then write the chosen trial to `best/`."""
    table: list[dict[str, Any]] = []
    if trial is None:
        trial, table = choose(s, study)
    refs = reference_scores(s, study) if s.cfg.export.references else {}
    best = {"trial": trial.number, "params": trial.params, "chosen_by": HELDOUT if table else SEARCH,
            SEARCH: {"tasks": trial.user_attrs.get("scores", {}), "objective": value_of(trial)}}
    if s.cfg.export.heldout and HELDOUT in s.splits:
        best[HELDOUT] = heldout_of(s, study, trial)
    if s.cfg.export.repeats > 1:
        best["noise"] = noise(s, trial, s.cfg.export.repeats)
    experts = {n: refs[n] for n in s.models.names if n in refs}
    split = HELDOUT if HELDOUT in s.splits else SEARCH
    top_expert = max(experts, key=lambda n: experts[n][split]["objective"], default=None)
    report = {
        "study": s.cfg.study_name, "objective": [o.name for o in s.objective.specs], "best": best,
        "heldout_table": table, "references": refs, "baselines": baseline_scores(s, study),
        "best_expert": {"name": top_expert, "split": split,
                        "objective": experts[top_expert][split]["objective"]} if top_expert else None,
        "n_trials_seen": len(study.get_trials(deepcopy=False)),
        "timing_seconds_per_trial": {k: (sum(v) / len(v) if v else None) for k, v in s.timings.items()},
    }
    out = write_trial(s, trial, dest or s.run_dir / "best", report)
    if table:
        (out / "heldout_table.csv").write_text(_csv(table), encoding="utf-8")
    return out


def export_pareto(s: Session, study: optuna.Study) -> Path:
    """Multi-objective studies: every Pareto-front trial to `pareto/trial_<n>/`, plus `pareto.json`."""
    root = s.run_dir / "pareto"
    rows = []
    for t in sorted(study.best_trials, key=lambda t: t.number):
        row = {"trial": t.number, SEARCH: {"values": t.values, "tasks": t.user_attrs.get("scores", {})}}
        if HELDOUT in s.splits:
            scores = score(s, s.space.plan(t.params), HELDOUT, trial=t.number)
            row[HELDOUT] = {"values": [o.value(scores) for o in s.objective.specs], "tasks": scores.tasks}
        write_trial(s, t, root / f"trial_{t.number}", row)
        rows.append(row)
    doc = {"objectives": [o.name for o in s.objective.specs],
           "directions": [o.direction for o in s.objective.specs], "front": rows}
    (root / "pareto.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return root


def write_trial(s: Session, trial: optuna.trial.FrozenTrial, dest: Path, scores: dict[str, Any]) -> Path:
    """Re-materialise `trial` in the live model and save it with its recipe and scores."""
    plan = s.space.plan(trial.params)
    s.applier.apply(plan, seed=s.cfg.seed, trial=trial.number)
    header = (f"merge-optimizer recipe: study {s.cfg.study_name}, trial {trial.number}, "
              f"search objective {value_of(trial)}")
    recipe = dump_recipe(recipe_doc(s, plan, trial.number), header)
    return write_model_dir(s, dest, recipe=recipe, scores=scores)


def is_current(dest: Path, study: optuna.Study) -> bool:
    """True when `dest` holds an export made after the study's last finished trial."""
    try:
        scores = json.loads((dest / "scores.json").read_text())
    except (OSError, ValueError):
        return False
    return scores.get("n_trials_seen") == len(study.get_trials(deepcopy=False))


def write_model_dir(s: Session, dest: Path, *, recipe: str, scores: dict[str, Any]) -> Path:
    """Save the live model + tokenizer + recipe + scores to `dest` via a temp dir and renames."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    s.live.save_pretrained(tmp)
    s.tokenizer.save_pretrained(tmp)
    (tmp / "recipe.yaml").write_text(recipe, encoding="utf-8")
    (tmp / "scores.json").write_text(json.dumps(scores, indent=1, default=str), encoding="utf-8")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def _csv(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    return "\n".join([",".join(cols), *(",".join(str(r[c]) for c in cols) for r in rows)]) + "\n"


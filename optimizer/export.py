"""Write the best trial as a loadable HF model folder with its recipe and an honest score table."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import optuna

from optimizer.artifacts import dump_recipe, recipe_doc
from optimizer.eval.base import HELDOUT, SEARCH


def _splits(s: Any) -> tuple[str, ...]:
    return tuple(s.evaluator.splits()) if hasattr(s.evaluator, "splits") else (SEARCH,)


def _value(trial: optuna.trial.FrozenTrial) -> Any:
    values = trial.values or []
    return values[0] if len(values) == 1 else values


def _entry(s: Any, scores: Any) -> dict[str, Any]:
    return {"tasks": scores.tasks, "objective": s.objective.value(scores)}


def reference_scores(s: Any, study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The anchor (base or target) and each fine-tune alone, per split; cached on the study."""
    cached: dict[str, Any] = dict(study.user_attrs.get("references", {}))
    anchor = "target" if s.cfg.models.target else "base"
    for idx, name in [(None, anchor), *enumerate(s.models.names)]:
        for split in _splits(s):
            key = f"{name}/{split}"
            if key not in cached:
                s.applier.apply_single(idx)
                cached[key] = _entry(s, s.evaluator.evaluate(s.live, s.tokenizer, split))
    study.set_user_attr("references", cached)
    out: dict[str, dict[str, Any]] = {}
    for key, v in cached.items():
        name, split = key.rsplit("/", 1)
        out.setdefault(name, {})[split] = v
    return out


def baseline_scores(s: Any, study: optuna.Study) -> dict[str, dict[str, Any]]:
    """Each completed baseline trial's search score and (re-evaluated) held-out score."""
    cached: dict[str, Any] = dict(study.user_attrs.get("baseline_heldout", {}))
    out = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        label = t.user_attrs.get("baseline")
        if not label or label in out:
            continue
        entry = {"trial": t.number, SEARCH: {"tasks": t.user_attrs.get("scores", {}), "objective": _value(t)}}
        if HELDOUT in _splits(s):
            if label not in cached:
                cached[label] = evaluate_trial(s, t, HELDOUT)
            entry[HELDOUT] = cached[label]
        out[label] = entry
    study.set_user_attr("baseline_heldout", cached)
    return out


def evaluate_trial(s: Any, trial: optuna.trial.FrozenTrial, split: str) -> dict[str, Any]:
    s.applier.apply(s.space.plan(trial.params), seed=s.cfg.seed, trial=trial.number)
    return _entry(s, s.evaluator.evaluate(s.live, s.tokenizer, split))


def export_best(s: Any, study: optuna.Study, trial: optuna.trial.FrozenTrial | None = None,
                dest: Path | None = None) -> Path:
    """Evaluate references and baselines, re-materialise the chosen trial, and write `best/` atomically."""
    trial = trial or study.best_trial
    refs = reference_scores(s, study) if s.cfg.export.references else {}
    baselines = baseline_scores(s, study)
    best = {"trial": trial.number, "params": trial.params,
            SEARCH: {"tasks": trial.user_attrs.get("scores", {}), "objective": _value(trial)}}
    if s.cfg.export.heldout and HELDOUT in _splits(s):
        best[HELDOUT] = evaluate_trial(s, trial, HELDOUT)
    s.applier.apply(s.space.plan(trial.params), seed=s.cfg.seed, trial=trial.number)
    experts = {n: refs[n] for n in s.models.names if n in refs}
    split = HELDOUT if HELDOUT in _splits(s) else SEARCH
    best_expert = max(experts, key=lambda n: experts[n][split]["objective"], default=None)
    report = {
        "study": s.cfg.study_name, "objective": [o.name for o in s.objective.specs],
        "best": best, "references": refs, "baselines": baselines,
        "best_expert": {"name": best_expert, "split": split,
                        "objective": experts[best_expert][split]["objective"]} if best_expert else None,
        "timing": {k: (sum(v) / len(v) if v else None) for k, v in s.timings.items()},
    }
    header = (f"merge-optimizer recipe: study {s.cfg.study_name}, trial {trial.number}, "
              f"search objective {_value(trial)}")
    return write_model_dir(s, dest or s.run_dir / "best", recipe=dump_recipe(recipe_doc(s, s.space.plan(trial.params)),
                                                                     header), scores=report)


def is_current(dest: Path, study: optuna.Study) -> bool:
    """True when `dest` already holds the export of the study's current best trial."""
    try:
        scores = json.loads((dest / "scores.json").read_text())
    except (OSError, ValueError):
        return False
    return len(study.directions) == 1 and scores.get("best", {}).get("trial") == study.best_trial.number


def write_model_dir(s: Any, dest: Path, *, recipe: str, scores: dict[str, Any]) -> Path:
    """Save the live model + tokenizer + recipe + scores to `dest` via a temp dir and renames."""
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


if __name__ == "__main__":
    from optimizer.cli import hydra_entry
    from optimizer.export_cli import export

    hydra_entry(export)()

"""Write chosen trials as loadable HF model folders with their recipe and an honest score table."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from optimizer import UserError
from optimizer.artifacts import dump_recipe, recipe_doc
from optimizer.eval.base import HELDOUT, SEARCH
from optimizer.export.heldout import (
    baseline_scores,
    choose,
    comparison,
    heldout_of,
    noise,
    reference_scores,
    value_of,
)
from optimizer.locks import file_lock
from optimizer.recovery import pid_alive
from optimizer.session import Session, score

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


@contextlib.contextmanager
def export_lock(run_dir: Path) -> Iterator[None]:
    """One exporter at a time per study folder (workers, `python -m optimizer.export`); reentrant."""
    with file_lock(Path(run_dir) / ".export.lock", "export lock"):
        yield


def export_best(s: Session, study: optuna.Study, trial: optuna.trial.FrozenTrial | None = None,
                dest: Path | None = None) -> Path:
    """Score references, baselines and the top-k on held-out, then write the chosen trial to `best/`."""
    with export_lock(s.run_dir):
        return _export_best(s, study, trial, dest)


def _export_best(s: Session, study: optuna.Study, trial: optuna.trial.FrozenTrial | None,
                 dest: Path | None) -> Path:
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
        **study_state(study),
        "timing_seconds_per_trial": {k: (sum(v) / len(v) if v else None) for k, v in s.timings.items()},
    }
    report["comparison"] = comparison(report)
    study.set_user_attr("comparison", report["comparison"])  # the report reads it from the study
    extra = {"heldout_table.csv": _csv(table)} if table else {}
    return write_trial(s, trial, dest or s.run_dir / "best", report, extra=extra)


def export_pareto(s: Session, study: optuna.Study) -> Path:
    """Multi-objective studies: every Pareto-front trial to `pareto/trial_<n>/`, plus `pareto.json`."""
    with export_lock(s.run_dir):
        return _export_pareto(s, study)


def _export_pareto(s: Session, study: optuna.Study) -> Path:
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
    _write_text(root / "pareto.json", json.dumps(doc, indent=1))
    return root


def write_trial(s: Session, trial: optuna.trial.FrozenTrial, dest: Path, scores: dict[str, Any],
                extra: dict[str, str] | None = None) -> Path:
    """Re-materialise `trial` in the live model and save it with its recipe and scores."""
    plan = s.space.plan(trial.params)
    s.applier.apply(plan, seed=s.cfg.seed, trial=trial.number)
    header = (f"merge-optimizer recipe: study {s.cfg.study_name}, trial {trial.number}, "
              f"search objective {value_of(trial)}")
    recipe = dump_recipe(recipe_doc(s, plan, trial.number), header)
    return write_model_dir(s, dest, recipe=recipe, scores=scores, extra=extra)


def study_state(study: optuna.Study) -> dict[str, int]:
    """What an export was made from: every trial seen, and how many had completed."""
    trials = study.get_trials(deepcopy=False)
    return {"n_trials_seen": len(trials),
            "n_complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)}


def is_current(dest: Path, study: optuna.Study) -> bool:
    """True when `dest` holds a complete export made from the study as it is now (no trial added or
    completed since; a trial another worker was running when it was written has completed since)."""
    try:
        scores = json.loads((dest / "scores.json").read_text())
    except (OSError, ValueError):
        return False
    state = study_state(study)
    return all(scores.get(k) == v for k, v in state.items())


def clean_temps(parent: Path) -> list[Path]:
    """Remove the `.NAME.tmp-PID` / `.NAME.old-PID` folders that killed or failed exports left in `parent`.

    Run under the export lock, so no live exporter on this machine owns one (a live PID's folders are kept
    anyway). A `.NAME.old-PID` whose NAME is missing was the previous export, moved aside just before the
    process died: it is put back.
    """
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    found = [(p, m) for p in parent.iterdir() if (m := _TEMP.match(p.name))]
    for p, m in sorted(found, key=lambda pm: pm[1]["kind"] == "tmp"):  # restore old-* before removing tmp-*
        pid = int(m["pid"])
        if pid != os.getpid() and pid_alive(pid):
            continue
        dest = parent / m["name"]
        if m["kind"] == "old" and not dest.exists():
            p.rename(dest)
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def write_model_dir(s: Session, dest: Path, *, recipe: str, scores: dict[str, Any],
                    extra: dict[str, str] | None = None) -> Path:
    """Save the live model + tokenizer + recipe + scores to `dest` via a temp dir and renames.

    `dest` is always a complete export: the new one is written beside it, the old one moved aside, the new one
    renamed in, the old one removed. Leftovers of killed exports are cleaned first; a full or read-only disk
    is a UserError with nothing half-written left behind.
    """
    with export_lock(s.run_dir):
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_temps(dest.parent)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        try:
            s.live.save_pretrained(tmp)
            s.tokenizer.save_pretrained(tmp)
            (tmp / "recipe.yaml").write_text(recipe, encoding="utf-8")
            for name, text in (extra or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
            (tmp / "scores.json").write_text(json.dumps(scores, indent=1, default=str), encoding="utf-8")
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"cannot write the export {str(dest)!r}: {e.strerror or e}"
                            f"{' (disk full)' if e.errno == errno.ENOSPC else ''}. The previous export (if "
                            "any) is unchanged; free some space or point run_root at a writable folder, then "
                            "rerun the same command to export.") from None
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        return dest


def _write_text(path: Path, text: str) -> None:
    """Write a file whole (temp file + rename): a killed export never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _csv(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    return "\n".join([",".join(cols), *(",".join(str(r[c]) for c in cols) for r in rows)]) + "\n"


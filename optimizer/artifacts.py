"""Per-trial artifacts (recipe, scores, evaluator transcripts) through optuna.artifacts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from optimizer.eval.base import Scores
from optimizer.merge.recipe import dump_recipe, recipe_doc  # the mergekit format's home; re-exported
from optimizer.plan import MergePlan
from optimizer.session import Session


def artifact_store(run_dir: Path) -> FileSystemArtifactStore:
    path = run_dir / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base_path=str(path))


_MIME = {".yaml": "text/yaml", ".json": "application/json", ".jsonl": "text/plain", ".txt": "text/plain",
         ".md": "text/markdown", ".csv": "text/csv"}


def attach(store: FileSystemArtifactStore, trial: optuna.Trial, plan: MergePlan, scores: Scores | None, s: Session,
           extra: dict[str, str] | None = None) -> None:
    """Upload recipe.yaml, plan.json, scores.json and the evaluator's files to the trial (dashboard-visible).

    `scores` is None for a failed trial: its recipe and the evaluator's transcripts (`extra`) are still kept.
    """
    files = {
        "recipe.yaml": dump_recipe(recipe_doc(s, plan, trial.number),
                                   f"study {s.cfg.study_name}, trial {trial.number}"),
        "plan.json": json.dumps(plan.to_dict(), indent=1),
    }
    if scores is not None:
        files["scores.json"] = json.dumps({"tasks": scores.tasks, "metrics": scores.metrics, "info": scores.info},
                                          indent=1, default=str)
        files.update(scores.artifacts)
    files.update(extra or {})
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8")
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                            mimetype=_MIME.get(path.suffix, "text/plain"), encoding="utf-8")

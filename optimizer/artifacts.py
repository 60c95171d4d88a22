"""Per-trial artifacts (recipe, scores, evaluator transcripts) through optuna.artifacts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from optimizer.plan import MergePlan


def artifact_store(run_dir: Path) -> FileSystemArtifactStore:
    path = run_dir / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base_path=str(path))


def recipe_doc(s: Any, plan: MergePlan) -> dict[str, Any]:
    """The plan as a mergekit YAML document, with model references mergekit can open."""
    m = s.models

    def ref(ckpt: Any) -> str:
        return str(ckpt.path) if ckpt.ref.startswith("zoo://") else ckpt.ref

    sources = {name: ref(c) for name, c in m.experts.items()}
    dtype = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}[str(m.dtype)]
    return plan.to_mergekit(sources, ref(m.base), dtype)


def dump_recipe(doc: dict[str, Any], header: str = "") -> str:
    body = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


_MIME = {".yaml": "text/yaml", ".json": "application/json", ".jsonl": "text/plain", ".txt": "text/plain",
         ".md": "text/markdown", ".csv": "text/csv"}


def attach(store: FileSystemArtifactStore, trial: Any, plan: MergePlan, scores: Any, s: Any,
           extra: dict[str, str] | None = None) -> None:
    """Upload recipe.yaml, plan.json, scores.json and the evaluator's files to the trial (dashboard-visible).

    `scores` is None for a failed trial: its recipe and the evaluator's transcripts (`extra`) are still kept.
    """
    files = {
        "recipe.yaml": dump_recipe(recipe_doc(s, plan), f"study {s.cfg.study_name}, trial {trial.number}"),
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

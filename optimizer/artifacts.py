"""Per-trial artifacts (recipe, scores, evaluator transcripts) through optuna.artifacts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from optimizer.checkpoint import locate
from optimizer.eval.base import Scores
from optimizer.plan import MergePlan
from optimizer.session import Session


def artifact_store(run_dir: Path) -> FileSystemArtifactStore:
    path = run_dir / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base_path=str(path))


def recipe_doc(s: Session, plan: MergePlan, trial: int | None = None) -> dict[str, Any]:
    """The plan as a mergekit YAML document, with model references mergekit can open.

    What mergekit cannot state goes under the `merge_optimizer` key (ignored by mergekit), so that
    `python -m optimizer.merge recipe.yaml OUT` reproduces the trial's weights exactly: the study seed, trial
    number and device type of random masks (DARE, DELLA), the chat-vector target, linear's base, a
    non-default vocabulary policy (see `MergePlan.to_mergekit` for the value conversions).

    Args:
        s: the run session (models, cfg).
        plan: the trial's merge plan.
        trial: trial number (needed for stochastic methods).
    """
    from optimizer.merge.registry import METHODS

    m = s.models

    def ref(ckpt: Any) -> str:
        return mergekit_ref(ckpt.ref, ckpt.path)

    sources = {name: ref(c) for name, c in m.experts.items()}
    dtype = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}[str(m.dtype)]
    ext: dict[str, Any] = {}
    if METHODS[plan.method].stochastic:
        ext.update(seed=int(s.cfg.seed), trial=int(trial or 0), device=s.device.type)
    if m.target is not m.base:
        ext["target"] = ref(m.target)
    if m.vocab_policy != "error":
        ext["vocab_policy"] = m.vocab_policy
    doc = plan.to_mergekit(sources, ref(m.base), dtype, extension=ext)
    if getattr(s.cfg.models, "tokenizer", None):
        tok = s.cfg.models.tokenizer
        doc["tokenizer_source"] = mergekit_ref(tok, locate(tok, what="models.tokenizer"))
    return doc


def mergekit_ref(ref: str, path: Path) -> str:
    """How a recipe names a model: hub ids as they are; zoo models and local folders as absolute paths, so
    that mergekit can open them and the recipe works from any directory."""
    local = ref.startswith("zoo://") or Path(ref).expanduser().is_dir()
    return str(Path(path).resolve()) if local else ref


_EXTENSION_NOTES = {
    "seed": "seed, trial, device: random masks (DARE/DELLA) are drawn per tensor from seed_for(seed, trial, "
            "tensor name) on that device type; mergekit draws its own (same method, other draws)",
    "rescale": "rescale: inverse_density divides kept entries by their keep probability (the papers); "
               "mergekit has no equivalent and applies its L1 rescale (rescale: true) instead",
    "target": "target: the task vectors are added to this model (chat vector), not to base_model as mergekit does",
    "vocab_policy": "vocab_policy: vocabularies differ; task vectors cover the rows shared with the base",
    "base": "base: the task vectors' reference; mergekit's linear takes no base_model (same average up to "
            "float rounding)",
}


def dump_recipe(doc: dict[str, Any], header: str = "") -> str:
    """YAML text of a recipe document, `header` and notes on the `merge_optimizer` key as comments."""
    from optimizer.plan import MERGEKIT_EXTENSION

    lines = header.splitlines()
    ext = doc.get(MERGEKIT_EXTENSION) or {}
    if ext:
        lines.append(f"{MERGEKIT_EXTENSION}: read by `python -m optimizer.merge` (exact re-application), "
                     "ignored by mergekit:")
        lines += [f"  {note}" for key, note in _EXTENSION_NOTES.items() if key in ext]
    body = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    return "".join(f"# {line}\n" for line in lines) + body


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

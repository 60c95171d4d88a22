"""A judge study's answers and judgments in FastChat's llm_judge folder layout, for FastChat's result tools.

Each trial of an `evaluator=mt_bench` study keeps `answers.jsonl` and `judgments.jsonl` as Optuna artifacts
(FastChat's line formats plus our extra fields, see audit.py). `write_layout` lays them out as FastChat's
`gen_model_answer.py` / `gen_judgment.py` would have:

    runs/<study>/fastchat/data/mt_bench/question.jsonl                     the bench (when it is found)
    runs/<study>/fastchat/data/mt_bench/model_answer/trial_<N>.jsonl       one "model" per trial
    runs/<study>/fastchat/data/mt_bench/model_judgment/<judge>_single.jsonl every trial's judgments

so, from `runs/<study>/fastchat/`, FastChat's `python -m fastchat.llm_judge.show_result --bench-name mt_bench
--judge-model <judge>` prints the per-trial MT-Bench table (turn 1, turn 2, average), and its
`common.load_model_answers` / `load_single_model_judgments` read the folders. A failed judgment is written
with score -1, FastChat's marker that its tools leave out (our own judgments.jsonl keeps null).
`python -m optimizer.report study_name=S` writes the layout for judge studies.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

from optimizer.eval.judge.audit import ANSWERS_FILE, JUDGMENTS_FILE
from optimizer.resources import resolve_path

BENCH = "mt_bench"
FAILED_SCORE = -1  # FastChat's score of a judgment without a rating (show_result drops it)


def model_name(trial: int) -> str:
    """The FastChat model id of a trial (answer file stem, `model` field of its judgments)."""
    return f"trial_{trial}"


def judge_file(judge: str) -> str:
    """`<judge>_single.jsonl`, the judge id made a file name (`local:zoo://base` -> `local_zoo_base`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", judge).strip("_") + "_single.jsonl"


def fastchat_answers(text: str, model: str) -> list[dict[str, Any]]:
    """Our answers.jsonl lines with FastChat's `model_id` set to `model`."""
    return [{**json.loads(line), "model_id": model} for line in text.splitlines() if line.strip()]


def fastchat_judgments(text: str, model: str) -> list[dict[str, Any]]:
    """Our judgments.jsonl lines with `model` set and a failed judgment's null score as FastChat's -1."""
    out = []
    for line in text.splitlines():
        if line.strip():
            d = json.loads(line)
            d["model"] = model
            if d.get("score") is None:
                d["score"] = FAILED_SCORE
            out.append(d)
    return out


def _trial_files(study: optuna.Study, storage: Any, store: FileSystemArtifactStore,
                 trial: optuna.trial.FrozenTrial, tmp: Path) -> dict[str, str]:
    files = {}
    for meta in get_all_artifact_meta(trial, storage=storage):
        if meta.filename in (ANSWERS_FILE, JUDGMENTS_FILE):
            path = tmp / f"{trial.number}-{meta.artifact_id}"
            download_artifact(artifact_store=store, file_path=str(path), artifact_id=meta.artifact_id)
            files[meta.filename] = path.read_text(encoding="utf-8")
    return files


def write_layout(study: optuna.Study, storage: Any, run_dir: Path) -> Path | None:
    """Write `run_dir/fastchat/data/mt_bench/` from the trials' judge artifacts (replacing an older one).

    Args:
        study: the study (read only).
        storage: its Optuna storage (artifact metadata lives there).
        run_dir: `runs/<study>` (artifacts under `artifacts/`, the layout under `fastchat/`).

    Returns the bench folder, or None when no trial has judge artifacts (not an mt_bench study).
    """
    store_dir = run_dir / "artifacts"
    if not store_dir.is_dir():
        return None
    store = FileSystemArtifactStore(str(store_dir))
    answers: dict[str, list[dict[str, Any]]] = {}
    judgments: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            files = _trial_files(study, storage, store, trial, Path(tmp))
            model = model_name(trial.number)
            if ANSWERS_FILE in files:
                answers[model] = fastchat_answers(files[ANSWERS_FILE], model)
            for j in fastchat_judgments(files.get(JUDGMENTS_FILE, ""), model):
                judgments.setdefault(judge_file(j["judge"][0]), []).append(j)
    if not answers and not judgments:
        return None
    root = run_dir / "fastchat" / "data" / BENCH
    if root.exists():
        shutil.rmtree(root)
    (root / "model_answer").mkdir(parents=True)
    (root / "model_judgment").mkdir()
    for model, rows in answers.items():
        _write_jsonl(root / "model_answer" / f"{model}.jsonl", rows)
    for name, rows in judgments.items():
        _write_jsonl(root / "model_judgment" / name, rows)
    bench = ((study.user_attrs.get("config") or {}).get("evaluator") or {}).get("bench_dir")
    if bench and (resolve_path(bench) / "question.jsonl").is_file():
        shutil.copyfile(resolve_path(bench) / "question.jsonl", root / "question.jsonl")
    return root


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def show_result_command(root: Path) -> str:
    """The FastChat command that prints the per-trial table of a layout written by `write_layout`."""
    judges = sorted(p.name[: -len("_single.jsonl")] for p in (root / "model_judgment").glob("*_single.jsonl"))
    judge = judges[0] if judges else "JUDGE"
    return (f"cd {root.parent.parent} && python -m fastchat.llm_judge.show_result --bench-name {BENCH} "
            f"--judge-model {judge}")

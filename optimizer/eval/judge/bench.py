"""Bench questions in FastChat's `question.jsonl` format and their deterministic search/heldout split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer import UserError
from optimizer.eval.base import HELDOUT, SEARCH, SPLITS

MAX_TURNS = 2  # MT-Bench judges turn 1 alone and turn 2 in the context of turn 1; there is no turn-3 prompt


@dataclass(frozen=True)
class Question:
    """One bench question.

    Args:
        question_id: FastChat ids are ints; kept as given, compared as strings.
        category: e.g. writing, roleplay, reasoning, math, coding, extraction, stem, humanities.
        turns: the user's messages, one per turn.
        reference: optional reference answers, one per turn (math/reasoning/coding).
        language: optional ISO code of the question's language (our extension; FastChat ignores it).
    """

    question_id: Any
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] = field(default_factory=tuple)
    language: str | None = None

    @property
    def qid(self) -> str:
        return str(self.question_id)


def _parse_line(raw: str, where: str) -> Question:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); each line of question.jsonl is one JSON object "
                        "with question_id, category, turns[] and optional reference[].") from None
    turns, ref = obj.get("turns"), obj.get("reference") or []
    if obj.get("question_id") is None or not isinstance(obj.get("category"), str):
        raise UserError(f"{where}: needs 'question_id' and a string 'category'.")
    if not isinstance(turns, list) or not 1 <= len(turns) <= MAX_TURNS or not all(
            isinstance(t, str) and t.strip() for t in turns):
        raise UserError(f"{where}: 'turns' must be a list of 1 to {MAX_TURNS} non-empty strings.")
    if not isinstance(ref, list) or (ref and len(ref) < len(turns)) or not all(isinstance(r, str) for r in ref):
        raise UserError(f"{where}: 'reference' must be a list of strings, one per turn.")
    return Question(obj["question_id"], obj["category"], tuple(turns), tuple(ref), obj.get("language"))


def load_questions(path: Path) -> list[Question]:
    """Read and validate a question.jsonl (blank lines ignored; ids must be unique).

    Args:
        path: the file; a missing file is a UserError.
    """
    if not path.is_file():
        raise UserError(f"Bench file {path} not found. Point evaluator.bench_dir at a folder holding "
                        "question.jsonl (FastChat format), e.g. optimizer/data/mt_bench/en or optimizer/data/mt_bench/ja.")
    questions, seen = [], set()
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if raw.strip():
            q = _parse_line(raw, f"{path}:{n}")
            if q.qid in seen:
                raise UserError(f"{path}:{n}: question_id {q.question_id!r} appears twice.")
            seen.add(q.qid)
            questions.append(q)
    if not questions:
        raise UserError(f"Bench file {path} holds no questions.")
    return questions


def _rank(salt: str, qid: str) -> str:
    return hashlib.sha256(f"{salt}\0{qid}".encode()).hexdigest()


def split_questions(questions: list[Question], split: str, *, heldout_share: float, heldout_ids: list[str],
                    salt: str) -> list[Question]:
    """Return the questions of `split`, in bench order.

    Heldout is `heldout_ids` when given; else round(share * N) questions chosen by hash and stratified by
    category (each category's questions are ordered by hash and the heldout ones are drawn evenly across
    categories), so both splits cover the same kinds of questions and a new question never reshuffles the
    others. A share of 0 makes heldout the whole bench (there is nothing to hold out).

    Args:
        questions: the bench.
        split: "search" or "heldout".
        heldout_share: fraction of questions held out.
        heldout_ids: explicit heldout question ids (strings).
        salt: changes which questions are drawn.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if heldout_ids:
        unknown = set(heldout_ids) - {q.qid for q in questions}
        if unknown:
            raise UserError(f"evaluator.heldout_ids names unknown question ids {sorted(unknown)}.")
        held = set(heldout_ids)
    elif heldout_share == 0:
        return list(questions)
    else:
        by_cat: dict[str, list[Question]] = {}
        for q in questions:
            by_cat.setdefault(q.category, []).append(q)
        keyed = []
        for qs in by_cat.values():
            for pos, q in enumerate(sorted(qs, key=lambda q: _rank(salt, q.qid))):
                keyed.append(((pos + 0.5) / len(qs), _rank(salt + "/order", q.qid), q.qid))
        k = round(heldout_share * len(questions))
        held = {qid for *_, qid in sorted(keyed)[len(keyed) - k:]} if k else set()
    chosen = [q for q in questions if (q.qid in held) == (split == HELDOUT)]
    if not chosen:
        other = SEARCH if split == HELDOUT else HELDOUT
        raise UserError(f"The {split} split of the bench is empty (all {len(questions)} questions are {other}); "
                        "adjust evaluator.heldout_share or evaluator.heldout_ids.")
    return chosen

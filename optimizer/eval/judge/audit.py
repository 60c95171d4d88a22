"""Per-trial audit files: the answers and judgments, in FastChat's JSONL shapes plus our extra fields."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

from optimizer.eval.judge.bench import Question
from optimizer.eval.judge.scoring import Judgment

ANSWERS_FILE, JUDGMENTS_FILE = "answers.jsonl", "judgments.jsonl"


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def answers_jsonl(questions: list[Question], answers: list[list[str]], model_id: str = "merged") -> str:
    """FastChat model_answer lines: question_id, answer_id, model_id, choices[0].turns (+ category).

    The answer_id is a hash of the answer turns, so identical answers of two trials share it.
    """
    now = time.time()
    lines = []
    for q, turns in zip(questions, answers, strict=True):
        aid = hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode()).hexdigest()[:22]
        lines.append(_line({"question_id": q.question_id, "answer_id": aid, "model_id": model_id,
                            "category": q.category, "choices": [{"index": 0, "turns": turns}], "tstamp": now}))
    return "\n".join(lines) + "\n"


def judgments_jsonl(records: list[Judgment]) -> str:
    """FastChat single-judgment lines (question_id, model, judge=[judge, prompt], user_prompt, judgment,
    score, turn) plus judgment_index, raw_score, language_mismatch, cached, error and tokens.

    A failed judgment has score null (FastChat writes -1 and averages it in; we do not).
    """
    now = time.time()
    lines = []
    for r in records:
        d = dataclasses.asdict(r)
        d["judge"] = [d.pop("judge"), d.pop("prompt")]
        d.update(model="merged", tstamp=now)
        lines.append(_line(d))
    return "\n".join(lines) + "\n"

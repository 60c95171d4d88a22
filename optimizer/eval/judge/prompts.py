"""Judge prompts in FastChat's judge-prompt JSONL format, and parsing the `[[rating]]` out of a judgment."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from optimizer import UserError
from optimizer.eval.judge.bench import Question
from optimizer.eval.judge.config import PromptNames

RATING_MIN, RATING_MAX = 1.0, 10.0
ROLES = ("single", "single_ref", "multi", "multi_ref")
_NUM = r"(\d+(?:\.\d+)?)(?:\s*/\s*10)?"
# Most specific first; within a pattern the LAST match wins, because judges often quote the format
# ("reply with [[rating]], e.g. [[5]]") before giving their verdict at the end.
_RATING_PATTERNS = [
    re.compile(r"\[\[\s*" + _NUM + r"\s*\]\]"),
    re.compile(r"\[\s*" + _NUM + r"\s*\]"),
    re.compile(r"(?:rating|score|評価|点数|スコア)\s*(?:[:=]|は)?\s*\**\s*" + _NUM, re.IGNORECASE),
]


@dataclass(frozen=True)
class JudgePrompt:
    """One line of a judge-prompt JSONL (FastChat's keys; `type` other than "single" is ignored).

    Args:
        name: unique id, e.g. "single-v1"; part of the cache key together with the texts.
        system_prompt / prompt_template: the judge's system message and user message template with
            {question}/{answer}/{ref_answer_1} or {question_1}/{answer_1}/{question_2}/{answer_2}/{ref_answer_2}.
    """

    name: str
    type: str
    system_prompt: str
    prompt_template: str
    output_format: str = "[[rating]]"

    @property
    def multi(self) -> bool:
        return "{answer_2}" in self.prompt_template

    @property
    def needs_ref(self) -> bool:
        return "{ref_answer_1}" in self.prompt_template


def load_judge_prompts(path: Path) -> dict[str, JudgePrompt]:
    """Read a judge-prompt JSONL into name -> JudgePrompt.

    Args:
        path: the file (a missing or malformed file is a UserError).
    """
    if not path.is_file():
        raise UserError(f"Judge prompt file {path} not found. Set evaluator.judge_prompts to a FastChat-format "
                        "judge_prompts.jsonl, e.g. data/mt_bench/judge_prompts.jsonl.")
    prompts: dict[str, JudgePrompt] = {}
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            p = JudgePrompt(obj["name"], obj.get("type", "single"), obj.get("system_prompt", ""),
                            obj["prompt_template"], obj.get("output_format", "[[rating]]"))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{n}: not a judge prompt ({e}); each line needs name, type, "
                            "system_prompt and prompt_template.") from None
        prompts[p.name] = p
    return prompts


def select_prompts(prompts: dict[str, JudgePrompt], names: PromptNames) -> dict[str, JudgePrompt]:
    """Pick the prompt of each role (see PromptNames); raise UserError naming what is missing."""
    chosen = {}
    for role in ROLES:
        want_multi, want_ref = role.startswith("multi"), role.endswith("_ref")
        name = getattr(names, role)
        if name is not None:
            if name not in prompts:
                raise UserError(f"evaluator.prompts.{role}={name!r} is not in the judge prompt file "
                                f"(it has {sorted(prompts)}).")
            chosen[role] = prompts[name]
            continue
        fits = [p for p in prompts.values()
                if p.type == "single" and p.multi == want_multi and p.needs_ref == want_ref]
        if not fits:
            raise UserError(f"The judge prompt file has no single-answer prompt for role {role!r} "
                            f"(multi-turn={want_multi}, reference={want_ref}); add one or set evaluator.prompts.{role}.")
        chosen[role] = fits[0]
    return chosen


def render(prompt: JudgePrompt, q: Question, answers: list[str], turn: int) -> str:
    """The judge's user message for `turn` (1-based) of question `q` answered with `answers`."""
    ref = list(q.reference) + [""] * len(q.turns)
    fields = {"question": q.turns[turn - 1], "answer": answers[turn - 1], "ref_answer_1": ref[0],
              "ref_answer_2": ref[1]}
    for i in range(len(q.turns)):
        fields[f"question_{i + 1}"], fields[f"answer_{i + 1}"] = q.turns[i], answers[i]
    try:
        return prompt.prompt_template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"Judge prompt {prompt.name!r} has an unknown or malformed placeholder ({e}); "
                        f"known ones: {sorted(fields)}. Double literal braces as {{{{ }}}}.") from None


def prompt_for(prompts: dict[str, JudgePrompt], q: Question, turn: int) -> JudgePrompt:
    """The prompt role FastChat would use: turn 2 is judged multi-turn; a reference answer selects *_ref."""
    role = ("multi" if turn > 1 else "single") + ("_ref" if q.reference else "")
    return prompts[role]


def parse_rating(text: str | None) -> float | None:
    """The rating in a judgment, or None when there is none in range [1, 10].

    Full-width digits and brackets (common in Japanese replies) are normalised first.

    >>> parse_rating("Clear and correct. Rating: [[8]]")
    8.0
    >>> parse_rating("評価：［［７］］")
    7.0
    >>> parse_rating("I cannot rate this.") is None
    True
    """
    if not text:
        return None
    norm = unicodedata.normalize("NFKC", text)
    for pat in _RATING_PATTERNS:
        found = pat.findall(norm)
        if found:
            value = float(found[-1])
            return value if RATING_MIN <= value <= RATING_MAX else None
    return None

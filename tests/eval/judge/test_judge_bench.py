"""Bench files (shipped and user-written) and the deterministic search/heldout split."""

import json

import pytest

from optimizer import UserError
from optimizer.eval.judge.bench import load_questions, split_questions
from optimizer.eval.judge.config import PromptNames
from optimizer.eval.judge.language import detect_script
from optimizer.eval.judge.prompts import load_judge_prompts, prompt_for, render, select_prompts
from optimizer.resources import DATA_DIR

BENCH = DATA_DIR / "mt_bench"


@pytest.mark.parametrize("lang,script", [("en", "latin"), ("ja", "ja")])
def test_shipped_benches_are_complete(lang, script):
    qs = load_questions(BENCH / lang / "question.jsonl")
    assert 10 <= len(qs) <= 20 and all(len(q.turns) == 2 for q in qs)
    cats = {q.category for q in qs}
    assert {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"} <= cats
    for q in qs:
        assert bool(q.reference) == (q.category in ("math", "reasoning", "coding")), q.question_id
        assert q.language == lang and all(detect_script(t) == script for t in q.turns)
    prompts = select_prompts(load_judge_prompts(BENCH / "judge_prompts.jsonl"), PromptNames())
    for q in qs:  # every question renders with the shipped prompts, references where they exist
        text = render(prompt_for(prompts, q, 2), q, ["A1", "A2"], 2)
        assert "A1" in text and "A2" in text and q.turns[1] in text
        assert (q.reference[1] in text) if q.reference else "Reference" not in text


def _questions(n_per_cat=4, cats=("a", "b", "c")):
    from optimizer.eval.judge.bench import Question

    return [Question(f"{c}{i}", c, ("t",)) for c in cats for i in range(n_per_cat)]


def test_split_is_deterministic_disjoint_and_stratified():
    qs = _questions()
    kw = dict(heldout_share=0.25, heldout_ids=[], salt="s")
    search, held = split_questions(qs, "search", **kw), split_questions(qs, "heldout", **kw)
    assert len(held) == 3 and len(search) == 9 and not {q.qid for q in held} & {q.qid for q in search}
    assert sorted(q.category for q in held) == ["a", "b", "c"]  # one per category
    # membership depends on ids, not on the order of the file
    assert {q.qid for q in split_questions(list(reversed(qs)), "heldout", **kw)} == {q.qid for q in held}
    other = split_questions(qs, "heldout", heldout_share=0.25, heldout_ids=[], salt="other")
    assert len(other) == 3
    explicit = split_questions(qs, "heldout", heldout_share=0.25, heldout_ids=["a0", "b1"], salt="s")
    assert [q.qid for q in explicit] == ["a0", "b1"]
    assert split_questions(qs, "heldout", heldout_share=0.0, heldout_ids=[], salt="s") == qs
    with pytest.raises(UserError, match="unknown question ids"):
        split_questions(qs, "heldout", heldout_share=0.25, heldout_ids=["zz"], salt="s")
    with pytest.raises(UserError, match="empty"):
        split_questions(_questions(1, ("a",)), "heldout", heldout_share=0.2, heldout_ids=[], salt="s")


@pytest.mark.parametrize("line,match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"question_id": 1, "category": "x", "turns": []}), "turns"),
    (json.dumps({"question_id": 1, "category": "x", "turns": ["a", "b", "c"]}), "turns"),
    (json.dumps({"category": "x", "turns": ["a"]}), "question_id"),
    (json.dumps({"question_id": 1, "category": "x", "turns": ["a", "b"], "reference": ["r"]}), "reference"),
])
def test_bad_question_files_are_user_errors(tmp_path, line, match):
    f = tmp_path / "question.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(UserError, match=match):
        load_questions(f)


def test_missing_and_duplicate(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_questions(tmp_path / "question.jsonl")
    line = json.dumps({"question_id": 1, "category": "x", "turns": ["a"]})
    (tmp_path / "question.jsonl").write_text(f"{line}\n\n{line}\n")
    with pytest.raises(UserError, match="appears twice"):
        load_questions(tmp_path / "question.jsonl")

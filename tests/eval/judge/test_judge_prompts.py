"""Judge prompt files (ours and FastChat's layout), rating parsing, language detection and penalty."""

import json

import pytest

from optimizer import UserError
from optimizer.eval.judge.bench import Question
from optimizer.eval.judge.config import PromptNames
from optimizer.eval.judge.language import detect_script, expected_script, language_mismatch
from optimizer.eval.judge.prompts import load_judge_prompts, parse_rating, prompt_for, render, select_prompts
from optimizer.eval.judge.scoring import penalised


@pytest.mark.parametrize("text,want", [
    ("Good answer.\nRating: [[8]]", 8.0),
    ("Rating: [[7.5]]", 7.5),
    ("Format: [[rating]], e.g. [[5]] ... final verdict [[9]]", 9.0),  # last one wins
    ("[[ 6 ]]", 6.0),
    ("score [[8/10]]", 8.0),
    ("Rating: [4]", 4.0),
    ("Rating: 3", 3.0),
    ("評価：［［７］］", 7.0),   # full-width digits and brackets
    ("総合評価は 5 点です。評価: 5", 5.0),
    ("**Score:** 10", 10.0),
    ("Rating: [[11]]", None),  # out of range: not a rating
    ("Rating: [[0]]", None),
    ("I'd rather not grade this one.", None),
    ("Rating: [[rating]]", None),
    ("", None),
    (None, None),
])
def test_parse_rating(text, want):
    assert parse_rating(text) == want


FASTCHAT_LIKE = [
    {"name": "pair-v2", "type": "pairwise", "system_prompt": "s", "prompt_template": "{question}{answer_a}{answer_b}"},
    {"name": "single-v1", "type": "single", "system_prompt": "S1", "prompt_template": "Q {question} A {answer}"},
    {"name": "single-math-v1", "type": "single", "system_prompt": "S2",
     "prompt_template": "Q {question} R {ref_answer_1} A {answer}"},
    {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "S3",
     "prompt_template": "{question_1}|{answer_1}|{question_2}|{answer_2}"},
    {"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": "S4",
     "prompt_template": "{question_1}|{ref_answer_1}|{answer_1}|{question_2}|{ref_answer_2}|{answer_2}"},
]


def test_fastchat_prompt_file_is_understood(tmp_path):
    f = tmp_path / "judge_prompts.jsonl"
    f.write_text("\n".join(json.dumps(p) for p in FASTCHAT_LIKE) + "\n")
    chosen = select_prompts(load_judge_prompts(f), PromptNames())
    assert {k: v.name for k, v in chosen.items()} == {
        "single": "single-v1", "single_ref": "single-math-v1", "multi": "single-v1-multi-turn",
        "multi_ref": "single-math-v1-multi-turn"}
    q = Question(1, "math", ("q1", "q2"), ("r1", "r2"))
    assert render(prompt_for(chosen, q, 1), q, ["a1", "a2"], 1) == "Q q1 R r1 A a1"
    assert render(prompt_for(chosen, q, 2), q, ["a1", "a2"], 2) == "q1|r1|a1|q2|r2|a2"
    plain = Question(2, "writing", ("q1", "q2"))
    assert prompt_for(chosen, plain, 2).name == "single-v1-multi-turn"
    with pytest.raises(UserError, match="not in the judge prompt file"):
        select_prompts(load_judge_prompts(f), PromptNames(single="nope"))
    f.write_text(json.dumps(FASTCHAT_LIKE[1]) + "\n")
    with pytest.raises(UserError, match="single_ref"):
        select_prompts(load_judge_prompts(f), PromptNames())


@pytest.mark.parametrize("text,want", [
    ("これは日本語の回答です。", "ja"),
    ("PythonのlistとdictはO(1)で参照できますが、使い分けが大切です。", "ja"),  # a few Latin terms stay ja
    ("这是一个中文的回答。", "zh"),
    ("이것은 한국어 답변입니다.", "ko"),
    ("Это ответ на русском языке.", "cyrillic"),
    ("This is an English answer.", "latin"),
    ("Ceci est une réponse en français.", "latin"),
    ("日本語で書きます。\n```python\ndef long_function_name(argument): return argument\n```", "ja"),
    ("12345 !!!", "unknown"),
])
def test_detect_script(text, want):
    assert detect_script(text) == want


def test_language_penalty():
    ja_q = "日本語で答えてください。"
    assert expected_script(ja_q, None) == "ja" and expected_script("anything", "ja") == "ja"
    assert expected_script("Bonjour", "fr") == "latin"
    assert language_mismatch("I will answer in English instead.", "ja")
    assert not language_mismatch("はい、日本語で答えます。", "ja")
    assert not language_mismatch("42", "ja")  # no letters: no language to blame
    assert penalised(8.0, True, 0.5) == 4.0 and penalised(8.0, False, 0.5) == 8.0
    assert penalised(1.5, True, 1.0) == 1.0 and penalised(None, True, 0.5) is None

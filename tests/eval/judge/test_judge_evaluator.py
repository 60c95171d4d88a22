"""The mt_bench evaluator end to end: tiny live model -> answers -> real SDK -> fake judge server -> Scores."""

import json

import optuna
import pytest
from judge_fakes import KEY_ENV

import optimizer.eval.judge.evaluator as evaluator_mod
from optimizer.eval.base import EvaluationFailed, Scores
from optimizer.resources import DATA_DIR


def split_rating(user: str) -> str:
    # turn-2 prompts show the whole conversation; the fake judge rates turn 1 with 8 and turn 2 with 6
    return "Fine.\nRating: [[6]]" if "Start of the Conversation" in user else "Good.\nRating: [[8]]"


def test_scores_artifacts_and_cache_on_rerun(tiny_lm, openai_server, judge_key, make_evaluator):
    model, tok = tiny_lm
    openai_server.reply = split_rating
    ev = make_evaluator(openai_server, judge={"price_input_per_mtok": 2.0, "price_output_per_mtok": 8.0})
    s = ev.evaluate(model, tok, "search")
    n = len(s.items["mt_bench"])
    assert n == 12 and openai_server.calls == 2 * n  # 16 questions, 25% held out, 2 turns each
    assert s.tasks == {"mt_bench": pytest.approx(0.7)}
    assert s.metrics["mt_bench/turn1"] == pytest.approx(0.8) and s.metrics["mt_bench/turn2"] == pytest.approx(0.6)
    assert s.metrics["mt_bench/rating"] == pytest.approx(7.0) and s.metrics["mt_bench/math"] == pytest.approx(0.7)
    assert all(v == pytest.approx(0.7) for v in s.items["mt_bench"])
    info = s.info
    assert (info["judge_new"], info["judge_cache_hits"], info["judge_failures"], info["judge_requests"]) == (2 * n, 0, 0, 2 * n)
    assert info["judge_tokens_in"] > 0 and info["judge_cost_usd"] == pytest.approx(
        (info["judge_tokens_in"] * 2.0 + info["judge_tokens_out"] * 8.0) / 1e6)
    answers = [json.loads(line) for line in s.artifacts["answers.jsonl"].splitlines()]
    judgments = [json.loads(line) for line in s.artifacts["judgments.jsonl"].splitlines()]
    assert len(answers) == n and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    assert len(judgments) == 2 * n and {j["score"] for j in judgments} == {6.0, 8.0}
    assert judgments[0]["judge"] == ["openai:fake-judge", "mo-single-v1"] and "[Question]" in judgments[0]["user_prompt"]

    again = ev.evaluate(model, tok, "search")  # same weights -> same answers -> nothing new to pay for
    assert openai_server.calls == 2 * n and again.tasks == s.tasks
    assert again.info["judge_cache_hits"] == 2 * n and again.info["judge_new"] == 0
    assert again.info["judge_requests"] == 0  # counters are per evaluation, not cumulative
    assert again.info["judge_cost_saved_usd"] == info["judge_cost_usd"]
    # a new process (resumed run) shares the cache file
    fresh = make_evaluator(openai_server, n_judgments=2)
    twice = fresh.evaluate(model, tok, "search")
    assert openai_server.calls == 4 * n  # only judgment #2 of each (question, turn) is new
    assert twice.info["judge_cache_hits"] == 2 * n and twice.info["judge_noise_std"] == 0.0
    held = fresh.evaluate(model, tok, "heldout")
    assert len(held.items["mt_bench"]) == 4


def test_faults_are_survived_and_garbage_excluded(tiny_lm, openai_server, judge_key, make_evaluator):
    model, tok = tiny_lm
    openai_server.faults.extend(["429:ms", "500", "slow", "503"])
    ev = make_evaluator(openai_server, limit=8, heldout_share=0.0)
    q_text = json.loads((DATA_DIR / "mt_bench/en/question.jsonl").read_text().splitlines()[0])["turns"][0]
    openai_server.fault_for = lambda user: "garbage" if q_text in user else None  # both turns of question 1
    s = ev.evaluate(model, tok, "search")
    assert s.info["judge_failures"] == 2 and s.info["judge_retries"] >= 4 and s.info["judge_new"] == 16  # garbage is paid for too
    assert s.tasks["mt_bench"] == pytest.approx(0.7) and s.metrics["mt_bench/failed_share"] == pytest.approx(2 / 16)
    assert s.items["mt_bench"][0] != s.items["mt_bench"][0]  # NaN: question 1 has no score, is not scored -1
    bad = [json.loads(line) for line in s.artifacts["judgments.jsonl"].splitlines() if '"score": null' in line]
    assert len(bad) == 2 and all(b["error"] == "no [[rating]] in the reply" and b["judgment"] for b in bad)
    calls = openai_server.calls
    openai_server.fault_for = lambda user: None
    rerun = ev.evaluate(model, tok, "search")  # failed judgments were not cached: asked again, now fine
    assert openai_server.calls == calls + 2 and rerun.info["judge_cache_hits"] == 14
    assert rerun.info["judge_failures"] == 0


def test_too_many_failures_fail_the_trial(tiny_lm, openai_server, judge_key, make_evaluator):
    model, tok = tiny_lm
    openai_server.fault_for = lambda user: "garbage" if "Start of the Conversation" in user else None
    ev = make_evaluator(openai_server, limit=4, heldout_share=0.0, max_failed_share=0.2)
    with pytest.raises(EvaluationFailed, match=r"4/8 judgments failed \(50% > evaluator.max_failed_share=20%\)") as e:
        ev.evaluate(model, tok, "search")
    assert "no [[rating]]" in str(e.value)
    assert "judgments.jsonl" in e.value.artifacts and e.value.info["judge_new"] == 8  # failed trials stay auditable


def test_language_penalty(tiny_lm, openai_server, judge_key, make_evaluator, monkeypatch):
    model, tok = tiny_lm
    monkeypatch.setattr(evaluator_mod, "generate_answers",
                        lambda m, t, qs, s: [["I will answer in English."] * len(q.turns) for q in qs])
    ev = make_evaluator(openai_server, bench_dir="data/mt_bench/ja", limit=3, heldout_share=0.0,
                        language_penalty=0.5)
    s = ev.evaluate(model, tok, "search")
    assert s.tasks["mt_bench"] == pytest.approx(0.35) and s.metrics["mt_bench/language_mismatch_share"] == 1.0
    j = json.loads(s.artifacts["judgments.jsonl"].splitlines()[0])
    assert (j["raw_score"], j["score"], j["language_mismatch"]) == (7.0, 3.5, True)


def test_pruning_stops_judging(tiny_lm, openai_server, judge_key, make_evaluator):
    model, tok = tiny_lm
    seen = []

    def on_item(task, index, score):
        seen.append((task, index, score))
        raise optuna.TrialPruned()

    ev = make_evaluator(openai_server, judge={"parallel": 1}, heldout_share=0.0)
    with pytest.raises(optuna.TrialPruned):
        ev.evaluate(model, tok, "search", on_item=on_item)
    assert seen == [("mt_bench", 0, pytest.approx(0.7))]
    assert openai_server.calls <= 4 < 32  # the remaining judgments were never sent


def test_anthropic_judge_end_to_end(tiny_lm, anthropic_server, judge_key, make_evaluator):
    model, tok = tiny_lm
    anthropic_server.reply = split_rating
    s = make_evaluator(anthropic_server, limit=4, heldout_share=0.0).evaluate(model, tok, "search")
    assert isinstance(s, Scores) and s.tasks["mt_bench"] == pytest.approx(0.7) and anthropic_server.calls == 8
    assert s.info["judge_model"] == "anthropic:fake-judge"
    assert anthropic_server.requests[0]["path"] == "/v1/messages"
    assert KEY_ENV not in json.dumps(s.info)

"""Answer generation from a live model: chat templates, multi-turn, batching, stop strings, sampling."""

import pytest
import torch
from judge_fakes import build_tokenizer

import optimizer.eval.judge.generate as gen
from optimizer import UserError
from optimizer.eval.judge.bench import Question
from optimizer.eval.judge.chat import render_chat
from optimizer.eval.judge.generate import GenSettings, cut_at_stop, generate_answers

QS = [Question(1, "writing", ("Write a haiku.", "Now another one.")),
      Question(2, "math", ("What is 2+2?",)),
      Question(3, "roleplay", ("日本語で自己紹介してください。", "もう少し短く。"))]


def test_multi_turn_uses_chat_template_and_own_answers(tiny_lm, monkeypatch):
    model, tok = tiny_lm
    seen = []

    def spy(tokenizer, messages, conv_template):
        seen.append([dict(m) for m in messages])
        return render_chat(tokenizer, messages, conv_template)

    monkeypatch.setattr(gen, "render_chat", spy)
    answers = generate_answers(model, tok, QS, GenSettings(max_new_tokens=6, batch_size=2))
    assert [len(a) for a in answers] == [2, 1, 2]
    turn2 = [m for m in seen if len(m) == 3]
    assert len(turn2) == 2
    for msgs in turn2:  # turn 2 sees the model's own turn-1 answer
        qi = 0 if msgs[0]["content"] == QS[0].turns[0] else 2
        assert msgs[1] == {"role": "assistant", "content": answers[qi][0]}
        assert msgs[2]["content"] == QS[qi].turns[1]


def test_greedy_batching_matches_one_by_one(tiny_lm):
    model, tok = tiny_lm
    side = tok.padding_side
    model.train()
    one = generate_answers(model, tok, QS, GenSettings(max_new_tokens=8, batch_size=1))
    assert model.training  # the caller's mode is restored
    model.eval()
    batched = generate_answers(model, tok, QS, GenSettings(max_new_tokens=8, batch_size=8))
    assert one == batched and tok.padding_side == side  # the shared tokenizer is not modified


def test_stop_strings_cut_answers(tiny_lm):
    model, tok = tiny_lm
    plain = generate_answers(model, tok, QS[:1], GenSettings(max_new_tokens=24))[0][0]
    # the random model's text is whatever it is: cut at its first real (not U+FFFD) character after the start
    cut = next(i for i, c in enumerate(plain) if i > 0 and c != "\ufffd")
    stopped = generate_answers(model, tok, QS[:1], GenSettings(max_new_tokens=24, stop=[plain[cut]]))[0][0]
    assert stopped == plain[: plain.index(plain[cut])].strip() and len(stopped) < len(plain)
    assert cut_at_stop("Answer.<|im_end|>junk USER: more", ["USER:", "<|im_end|>"]) == "Answer."
    assert cut_at_stop("  no stop  ", []) == "no stop"


def test_named_template_fallback_and_missing_template(tiny_lm):
    model, _ = tiny_lm
    bare = build_tokenizer(chat_template=None)
    with pytest.raises(UserError, match="conv_template"):
        generate_answers(model, bare, QS[:1], GenSettings(max_new_tokens=2))
    text, stops = render_chat(bare, [{"role": "user", "content": "hi"}], "chatml")
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and stops == ("<|im_end|>",)
    text, _ = render_chat(bare, [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}], "mistral")
    assert text == "<s>[INST] S\n\nhi [/INST]"
    answers = generate_answers(model, bare, QS[:1], GenSettings(max_new_tokens=2, conv_template="vicuna"))
    assert len(answers[0]) == 2
    with pytest.raises(UserError, match="unknown"):
        render_chat(bare, [{"role": "user", "content": "hi"}], "no-such-template")


def test_sampling_only_where_asked_and_reproducible(tiny_lm):
    model, tok = tiny_lm
    state = torch.get_rng_state()
    hot = GenSettings(max_new_tokens=8, category_temperature={"writing": 5.0}, seed=3)
    a, b = generate_answers(model, tok, QS, hot), generate_answers(model, tok, QS, hot)
    greedy = generate_answers(model, tok, QS, GenSettings(max_new_tokens=8))
    assert a == b  # seeded
    assert a[1:] == greedy[1:] and a[0] != greedy[0]  # only the writing question was sampled
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched


def test_context_budget_for_tiny_models():
    class Small:
        class config:  # noqa: N801 (stands in for a model's config)
            max_position_embeddings = 16

    seqs, new = gen.fit_context(Small, [list(range(20)), [1, 2, 3]], 512)
    assert new == 8 and seqs == [list(range(12, 20)), [1, 2, 3]]  # the answer gets at most half the context
    assert gen.fit_context(Small, [[1]], 4) == ([[1]], 4)

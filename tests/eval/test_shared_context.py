"""Shared-context scoring equals lm-eval's `_loglikelihood_tokens` request by request (to float rounding),
keeps the order, leaves unshared and over-long requests to lm-eval, and turns itself off when a model's
cache misbehaves."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from optimizer.eval.shared_context import SharedContextScorer


@pytest.fixture(scope="module")
def lm(tiny_models):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["a"]).eval()
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tiny_models["a"]), batch_size=8,
                max_length=40)


def requests(seed: int = 0):
    """Multiple-choice-like groups (2-5 choices of 1-6 tokens after contexts of 3-30 tokens), singletons and
    one context + continuation longer than max_length (lm-eval truncates it from the left), shuffled."""
    rng = random.Random(seed)
    out = []
    for _ in range(12):
        ctx = [rng.randrange(4, 99) for _ in range(rng.randint(3, 30))]
        for _ in range(rng.randint(2, 5)):
            out.append((("", ""), ctx, [rng.randrange(4, 99) for _ in range(rng.randint(1, 6))]))
    for _ in range(5):
        out.append((("", ""), [rng.randrange(4, 99) for _ in range(rng.randint(3, 20))], [rng.randrange(4, 99)]))
    long_ctx = [rng.randrange(4, 99) for _ in range(38)]
    out += [(("", ""), long_ctx, [5, 6, 7]), (("", ""), long_ctx, [8, 9])]
    rng.shuffle(out)
    return out


def test_equals_lm_eval_request_by_request(lm):
    reqs = requests()
    scorer = SharedContextScorer(lm)
    got = scorer(reqs)
    want = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert scorer.enabled, scorer.reason
    assert len(got) == len(want)
    for (g_lp, g_greedy), (w_lp, w_greedy) in zip(got, want, strict=True):
        assert g_lp == pytest.approx(w_lp, abs=1e-4)
        assert g_greedy == w_greedy


def test_greedy_continuations_are_seen(lm):
    """is_greedy must be True where the continuation is the model's own argmax chain."""
    ctx = [10, 11, 12, 13]
    seq = list(ctx)
    with torch.no_grad():
        for _ in range(3):
            seq.append(int(lm.model(torch.tensor([seq])).logits[0, -1].argmax()))
    cont = seq[len(ctx):]
    reqs = [(("", ""), ctx, cont), (("", ""), ctx, [cont[0], (cont[1] + 1) % 90 + 4])]
    got = SharedContextScorer(lm)(reqs)
    want = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want] == [True, False]


def test_unshared_requests_go_to_lm_eval(lm, monkeypatch):
    scorer = SharedContextScorer(lm)
    scorer.enabled = True  # skip the first-call check: count what reaches the model through each path
    seen = []
    original = lm._loglikelihood_tokens
    monkeypatch.setattr(lm, "_loglikelihood_tokens", lambda r, **kw: seen.extend(r) or original(r, **kw))
    reqs = requests(1)
    scorer(reqs)
    counts = {}
    for _, ctx, _ in reqs:
        counts[tuple(ctx)] = counts.get(tuple(ctx), 0) + 1
    expected = [r for r in reqs if counts[tuple(r[1])] == 1 or len(r[1]) + len(r[2]) > lm.max_length + 1]
    assert sorted(map(repr, seen)) == sorted(map(repr, expected))


def test_a_model_whose_cache_fails_falls_back(lm, monkeypatch, caplog):
    scorer = SharedContextScorer(lm)

    def broken(*a, **kw):
        raise RuntimeError("this cache cannot be re-indexed")

    monkeypatch.setattr(scorer, "_shared", broken)
    reqs = requests(2)
    with caplog.at_level(logging.WARNING, logger="optimizer.eval.shared_context"):
        got = scorer(reqs)
    assert scorer.enabled is False and "re-indexed" in scorer.reason
    assert "shared-context scoring is off" in caplog.text
    assert got == lm._loglikelihood_tokens(reqs, disable_tqdm=True)  # lm-eval's own numbers, bit for bit


def test_a_mismatch_turns_it_off(lm, monkeypatch):
    scorer = SharedContextScorer(lm)
    real = scorer._shared
    monkeypatch.setattr(scorer, "_shared", lambda r, g: {k: (v[0] + 0.5, v[1]) for k, v in real(r, g).items()})
    reqs = requests(3)
    got = scorer(reqs)
    assert scorer.enabled is False and "lm-eval's" in scorer.reason
    assert got == lm._loglikelihood_tokens(reqs, disable_tqdm=True)

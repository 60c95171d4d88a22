"""Backoff, jitter and Retry-After of the judge retry loop (unit level; the HTTP level is in test_judge_clients)."""

import email.utils
import random

import pytest

from optimizer.eval.judge.retry import (
    JudgeCallError,
    RetryPolicy,
    TransientError,
    backoff_delay,
    call_with_retries,
    parse_retry_after,
)


def test_backoff_grows_exponentially_with_bounded_jitter():
    policy = RetryPolicy(backoff_base=1.0, backoff_max=8.0, jitter=0.5)
    rng = random.Random(0)
    for attempt, full in enumerate([1, 2, 4, 8, 8, 8]):
        delays = [backoff_delay(attempt, policy, rng) for _ in range(200)]
        assert all(full * 0.5 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full * 0.3  # jitter really spreads the retries
    assert backoff_delay(3, RetryPolicy(backoff_base=1.0, jitter=0.0), rng) == 8.0


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = email.utils.formatdate(1000.0 + 30, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=1000.0) == pytest.approx(30.0)
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


def _flaky(errors):
    calls = []

    def fn():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "ok"

    return fn, calls


def test_call_with_retries_honours_retry_after_and_gives_up():
    slept = []
    fn, calls = _flaky([TransientError("HTTP 429", retry_after=3.0), TransientError("HTTP 500")])
    policy = RetryPolicy(max_retries=3, backoff_base=0.1, backoff_max=1.0, jitter=0.5)
    assert call_with_retries(fn, policy, sleep=slept.append, rng=random.Random(1)) == "ok"
    assert len(calls) == 3 and slept[0] == 3.0 and 0.1 <= slept[1] <= 0.2  # server's wish, then backoff
    fn, calls = _flaky([TransientError("timeout")] * 5)
    with pytest.raises(JudgeCallError, match="timeout after 3 attempts"):
        call_with_retries(fn, RetryPolicy(max_retries=2, backoff_base=0.0), sleep=slept.append)
    fn, calls = _flaky([TransientError("HTTP 429", retry_after=3600.0)])
    with pytest.raises(JudgeCallError, match="retry_after_max"):
        call_with_retries(fn, RetryPolicy(retry_after_max=60.0), sleep=slept.append)
    fn, calls = _flaky([JudgeCallError("HTTP 400: bad request")])
    with pytest.raises(JudgeCallError, match="400"):
        call_with_retries(fn, RetryPolicy(), sleep=slept.append)
    assert len(calls) == 1  # permanent errors are not retried

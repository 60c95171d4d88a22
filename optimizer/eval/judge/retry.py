"""Retries for judge API calls: exponential backoff with jitter, honouring Retry-After.

The SDKs are created with `max_retries=0` and retried here, so one policy (and one set of tests) covers
OpenAI, Anthropic and every OpenAI-compatible server, and every attempt is counted.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_STATUSES = frozenset({408, 409, 425, 429})  # plus every 5xx (Anthropic's 529 "overloaded" included)


class JudgeCallError(RuntimeError):
    """A judgment request that did not produce a reply (after retries, or a permanent error)."""


class TransientError(Exception):
    """Worth retrying: 429/5xx/timeouts/connection resets. `retry_after` is the server's wish in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """See JudgeConfig for the fields."""

    max_retries: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    jitter: float = 0.5
    retry_after_max: float = 300.0


def backoff_delay(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Delay before retry number `attempt` (0-based): base*2^attempt capped, minus up to `jitter` of it."""
    full = min(policy.backoff_max, policy.backoff_base * 2.0 ** attempt)
    return full * (1.0 - policy.jitter * rng.random())


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, or `retry-after` as seconds or an HTTP date."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)


def classify_sdk_error(exc: Exception, sdk: Any, redact: Callable[[str], str] = str) -> Exception:
    """Map an `openai`/`anthropic` SDK exception to TransientError or JudgeCallError (both SDKs share names).

    Args:
        exc: the SDK's exception.
        sdk: the SDK module (for its exception classes).
        redact: scrubs secrets from the server's error text.
    """
    if isinstance(exc, sdk.APITimeoutError):
        return TransientError("timeout")
    if isinstance(exc, sdk.APIConnectionError):
        return TransientError("connection error")
    if isinstance(exc, sdk.APIStatusError):
        status = exc.status_code
        if status in RETRY_STATUSES or status >= 500:
            return TransientError(f"HTTP {status}", parse_retry_after(exc.response.headers))
        return JudgeCallError(redact(f"HTTP {status}: {str(exc)[:300]}"))
    return exc


def call_with_retries(fn: Callable[[], T], policy: RetryPolicy, *, sleep: Callable[[float], None] = time.sleep,
                      rng: random.Random | None = None, on_attempt: Callable[[], None] | None = None,
                      on_retry: Callable[[float, str], None] | None = None) -> T:
    """Call `fn` until it succeeds, raises a non-transient error, or retries run out.

    Args:
        fn: one attempt; raises TransientError to ask for a retry.
        policy: limits and backoff.
        sleep / rng: injectable for tests.
        on_attempt: called before each attempt (counts requests).
        on_retry: called with (delay, reason) before each wait.
    Raises:
        JudgeCallError: when retries are exhausted or the server asks for a wait above retry_after_max.
    """
    rng = rng or random.Random()
    for attempt in range(policy.max_retries + 1):
        if on_attempt:
            on_attempt()
        try:
            return fn()
        except TransientError as e:
            if attempt == policy.max_retries:
                raise JudgeCallError(f"{e} after {attempt + 1} attempts") from None
            delay = backoff_delay(attempt, policy, rng)
            if e.retry_after is not None:
                if e.retry_after > policy.retry_after_max:
                    raise JudgeCallError(f"{e} with Retry-After {e.retry_after:.0f}s > judge.retry_after_max") from None
                delay = max(delay, e.retry_after)  # never earlier than the server asked
            log.info("judge call failed (%s); retry %d/%d in %.2fs", e, attempt + 1, policy.max_retries, delay)
            if on_retry:
                on_retry(delay, str(e))
            sleep(delay)
    raise AssertionError("unreachable")

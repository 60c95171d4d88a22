"""Running many judgments: cache first, then the judge (threads for HTTP judges, batches for a local one).

Results come back in request order as soon as each is ready, so the evaluator can report per-question
scores to a pruner while later judgments are still in flight, and stop paying the moment it prunes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from optimizer import UserError
from optimizer.eval.judge.cache import JudgmentCache
from optimizer.eval.judge.clients import Completion
from optimizer.eval.judge.prompts import parse_rating


@dataclass(frozen=True)
class JudgeRequest:
    """One judgment to obtain. `key` identifies it in the cache (see evaluator.request_key)."""

    key: str
    prompt_name: str
    system: str
    user: str


@dataclass
class Outcome:
    """What a request produced: a reply with a rating, a reply without one, or an error (text None)."""

    text: str | None
    rating: float | None
    error: str | None = None
    cached: bool = False
    tokens_in: int = 0
    tokens_out: int = 0


class JudgeRunner:
    """Obtains judgments through a cache and a judge, counting what it did.

    Args:
        judge: an ApiJudge (thread pool of `parallel`) or a LocalJudge (`batched`, batches of batch_size).
        cache: the judgment cache, or None to always ask.
        parallel: concurrent requests for HTTP judges.
        batch_size: prompts per batch for a batched judge.
    """

    def __init__(self, judge: Any, cache: JudgmentCache | None, parallel: int = 4, batch_size: int = 4):
        self.judge, self.cache = judge, cache
        self.parallel, self.batch_size = parallel, batch_size
        self._lock = threading.Lock()
        self.counts = {"new": 0, "cache_hits": 0, "failures": 0, "tokens_in": 0, "tokens_out": 0,
                       "saved_tokens_in": 0, "saved_tokens_out": 0}

    def _count(self, **kv: int) -> None:
        with self._lock:
            for k, v in kv.items():
                self.counts[k] += v

    def _finish(self, req: JudgeRequest, got: Completion | Exception) -> Outcome:
        """Turn a reply or error into an Outcome; store parseable replies in the cache."""
        if isinstance(got, Exception):
            redact = getattr(self.judge, "redact", lambda s: s)
            self._count(failures=1)
            return Outcome(None, None, redact(f"{type(got).__name__}: {got}")[:300])
        self._count(new=1, tokens_in=got.tokens_in, tokens_out=got.tokens_out)
        rating = parse_rating(got.text)
        if rating is None:
            self._count(failures=1)
            return Outcome(got.text, None, "no [[rating]] in the reply", False, got.tokens_in, got.tokens_out)
        if self.cache is not None:
            self.cache.put(req.key, judge=self.judge.model_id, prompt=req.prompt_name, text=got.text,
                           tokens_in=got.tokens_in, tokens_out=got.tokens_out)
        return Outcome(got.text, rating, None, False, got.tokens_in, got.tokens_out)

    def _ask(self, req: JudgeRequest) -> Outcome:
        try:
            got: Completion | Exception = self.judge.complete(req.system, req.user)
        except UserError:
            raise
        except Exception as e:  # one bad judgment is counted and excluded, never fatal to the trial
            got = e
        return self._finish(req, got)

    def _ask_batch(self, reqs: list[JudgeRequest]) -> list[Outcome]:
        try:
            got: list = self.judge.complete_batch([(r.system, r.user) for r in reqs])
        except UserError:
            raise
        except Exception as e:
            got = [e] * len(reqs)
        return [self._finish(r, g) for r, g in zip(reqs, got, strict=True)]

    def _from_cache(self, requests: list[JudgeRequest]) -> dict[str, Outcome]:
        if self.cache is None:
            return {}
        hits = self.cache.get_many(sorted({r.key for r in requests}))
        return {k: Outcome(c.text, parse_rating(c.text), None, True, c.tokens_in, c.tokens_out)
                for k, c in hits.items()}

    def run(self, requests: list[JudgeRequest]) -> Iterator[tuple[int, Outcome]]:
        """Yield (index, Outcome) for each request, in order. Closing the iterator early cancels what is
        not started yet (in-flight requests finish and are cached)."""
        done = self._from_cache(requests)
        for r in requests:
            if r.key in done:
                self._count(cache_hits=1, saved_tokens_in=done[r.key].tokens_in,
                            saved_tokens_out=done[r.key].tokens_out)
        if getattr(self.judge, "batched", False):
            yield from self._run_batched(requests, done)
        else:
            yield from self._run_threaded(requests, done)

    def _run_threaded(self, requests: list[JudgeRequest], done: dict[str, Outcome]) -> Iterator[tuple[int, Outcome]]:
        pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="judge")
        try:
            futures: dict[str, Future] = {}
            for r in requests:  # identical requests within one evaluation are asked once
                if r.key not in done and r.key not in futures:
                    futures[r.key] = pool.submit(self._ask, r)
            for i, r in enumerate(requests):
                yield i, done[r.key] if r.key in done else futures[r.key].result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _run_batched(self, requests: list[JudgeRequest], done: dict[str, Outcome]) -> Iterator[tuple[int, Outcome]]:
        todo = list({r.key: r for r in requests if r.key not in done}.values())
        for i, r in enumerate(requests):
            if r.key not in done:
                # todo is in first-request order, so the pending key at hand always heads it
                chunk, todo = todo[:self.batch_size], todo[self.batch_size:]
                done.update({t.key: o for t, o in zip(chunk, self._ask_batch(chunk), strict=True)})
            yield i, done[r.key]

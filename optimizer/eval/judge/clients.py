"""Judge clients on today's SDKs: OpenAI Chat Completions (any base_url) and Anthropic Messages.

The key is read from the environment when the client is first needed and lives only inside the SDK client;
error texts are scrubbed of it before they reach a log, an artifact or a trial attribute.
"""

from __future__ import annotations

import importlib
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from optimizer import UserError
from optimizer.eval.judge.config import JudgeConfig
from optimizer.eval.judge.retry import JudgeCallError, RetryPolicy, call_with_retries, classify_sdk_error

NO_KEY = "no-key"  # placeholder for keyless OpenAI-compatible servers (the SDK insists on some key)


@dataclass
class Completion:
    """A judge reply with its token usage (0 when the server reports none)."""

    text: str
    tokens_in: int = 0
    tokens_out: int = 0


class JudgeStats:
    """Thread-safe counters of one evaluation: requests sent, retries, tokens."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = self.retries = self.tokens_in = self.tokens_out = 0
        self.retry_wait_s = 0.0

    def add(self, **counts: float) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


class ApiJudge:
    """Common part of the HTTP judges: key handling, retry loop, counters.

    Args:
        cfg: the judge config.
        sleep / rng: injectable for tests (backoff waits).
    """

    batched = False
    sdk_name = ""

    def __init__(self, cfg: JudgeConfig, *, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None):
        self.cfg = cfg
        self.stats = JudgeStats()
        self._sleep, self._rng = sleep, rng or random.Random()
        self._client: Any = None
        self._client_lock = threading.Lock()
        self.policy = RetryPolicy(cfg.max_retries, cfg.backoff_base, cfg.backoff_max, cfg.jitter,
                                  cfg.retry_after_max)

    @property
    def model_id(self) -> str:
        return f"{self.cfg.kind}:{self.cfg.model}"

    def _key(self) -> str:
        if not self.cfg.api_key_env:
            return NO_KEY
        key = os.environ.get(self.cfg.api_key_env)
        if not key:
            raise UserError(f"The environment variable {self.cfg.api_key_env} (judge.api_key_env) is not set.")
        return key

    def redact(self, text: str) -> str:
        """`text` with the API key (if any) replaced by ***."""
        key = os.environ.get(self.cfg.api_key_env or "", "")
        return text.replace(key, "***") if len(key) >= 4 else text

    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client(self._key())
            return self._client

    def complete(self, system: str, user: str) -> Completion:
        """One judgment, retried per policy; raises JudgeCallError (key-free message) when it fails."""
        sdk = self._sdk()

        def attempt() -> Completion:
            try:
                return self._call(self.client(), system, user)
            except sdk.APIError as e:
                if isinstance(e, sdk.APIStatusError) and e.status_code in (401, 403):
                    # Some servers echo (part of) the key in their 401 text: say nothing of it.
                    where = self.cfg.api_key_env or "none sent: judge.api_key_env is null"
                    raise JudgeCallError(f"HTTP {e.status_code}: the judge rejected the key ({where})") from None
                raise classify_sdk_error(e, sdk, redact=self.redact) from None

        try:
            return call_with_retries(attempt, self.policy, sleep=self._sleep, rng=self._rng,
                                     on_attempt=lambda: self.stats.add(requests=1),
                                     on_retry=lambda d, _r: self.stats.add(retries=1, retry_wait_s=d))
        except JudgeCallError as e:
            raise JudgeCallError(self.redact(str(e))) from None

    def _sdk(self) -> Any:
        return importlib.import_module(self.sdk_name)

    def _make_client(self, key: str) -> Any:
        raise NotImplementedError

    def _call(self, client: Any, system: str, user: str) -> Completion:
        raise NotImplementedError


class OpenAIJudge(ApiJudge):
    """OpenAI Chat Completions; with `base_url` any compatible server (vLLM, llama.cpp, Ollama, Azure v1)."""

    sdk_name = "openai"

    def _make_client(self, key: str) -> Any:
        import openai

        return openai.OpenAI(api_key=key, base_url=self.cfg.base_url, timeout=self.cfg.timeout, max_retries=0)

    def _call(self, client: Any, system: str, user: str) -> Completion:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        extra: dict[str, Any] = {self.cfg.max_tokens_param: self.cfg.max_tokens}
        if self.cfg.temperature is not None:
            extra["temperature"] = self.cfg.temperature
        resp = client.chat.completions.create(model=self.cfg.model, messages=messages, **extra)
        text = resp.choices[0].message.content if resp.choices else None
        usage = resp.usage
        return Completion(text or "", getattr(usage, "prompt_tokens", 0) or 0,
                          getattr(usage, "completion_tokens", 0) or 0)


class AnthropicJudge(ApiJudge):
    """Anthropic Messages API."""

    sdk_name = "anthropic"

    def _make_client(self, key: str) -> Any:
        import anthropic

        return anthropic.Anthropic(api_key=key, base_url=self.cfg.base_url, timeout=self.cfg.timeout,
                                   max_retries=0)

    def _call(self, client: Any, system: str, user: str) -> Completion:
        extra: dict[str, Any] = {"system": system} if system else {}
        if self.cfg.temperature is not None:
            # Today's SDK has no temperature argument (recent models fix it); send it raw only when asked.
            extra["extra_body"] = {"temperature": self.cfg.temperature}
        resp = client.messages.create(model=self.cfg.model, max_tokens=self.cfg.max_tokens,
                                      messages=[{"role": "user", "content": user}], **extra)
        text = "".join(getattr(b, "text", "") for b in resp.content if getattr(b, "type", "") == "text")
        usage = resp.usage
        return Completion(text, getattr(usage, "input_tokens", 0) or 0, getattr(usage, "output_tokens", 0) or 0)

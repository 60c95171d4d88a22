"""Test helpers: fake judge servers (OpenAI / Anthropic protocols, with faults), a tiny model, configs.

The real `openai` / `anthropic` SDKs talk to them. Each server runs on port 0 in a daemon thread and is
stopped by the fixture that started it; nothing here loops without bound.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from optimizer.eval.judge.config import JudgeConfig, MtBenchConfig

# Fault names: "429" (Retry-After: 1), "429:ms" (retry-after-ms: 50), "500", "503", "401", "slow", "garbage"
FAULTS = ("429", "429:ms", "500", "503", "401", "slow", "garbage")


def default_reply(user: str) -> str:
    return "The answer addresses the question adequately.\nRating: [[7]]"


class FakeJudgeServer:
    """A judge endpoint with injectable faults.

    Args:
        protocol: "openai" (POST /v1/chat/completions) or "anthropic" (POST /v1/messages).
        reply: user message -> reply text (the rating the fake judge gives).
        slow_s: how long a "slow" reply stalls (longer than the client's timeout in tests).
    """

    def __init__(self, protocol: str = "openai", reply: Callable[[str], str] = default_reply, slow_s: float = 1.0):
        self.protocol, self.reply, self.slow_s = protocol, reply, slow_s
        self.faults: deque[str] = deque()  # consumed one per request, in arrival order
        self.fault_for: Callable[[str], str | None] = lambda user: None  # content-based faults (order-free)
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> FakeJudgeServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}" + ("/v1" if self.protocol == "openai" else "")

    @property
    def calls(self) -> int:
        with self.lock:
            return len(self.requests)

    # -- protocol -------------------------------------------------------------------------------------
    def _pick_fault(self, user: str) -> str | None:
        with self.lock:
            queued = self.faults.popleft() if self.faults else None
        return queued or self.fault_for(user)

    def _ok_body(self, body: dict, text: str) -> dict:
        user = body["messages"][-1]["content"]
        n_in, n_out = len(user.split()) + 10, len(text.split())
        if self.protocol == "openai":
            return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "fake"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}
        return {"id": "msg_fake", "type": "message", "role": "assistant", "model": body.get("model", "fake"),
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": n_in, "output_tokens": n_out}}

    def _error_body(self, status: int) -> dict:
        kind = {429: "rate_limit_error", 401: "authentication_error"}.get(status, "api_error")
        if self.protocol == "openai":
            return {"error": {"message": f"fake {status}", "type": kind, "code": None}}
        return {"type": "error", "error": {"type": kind, "message": f"fake {status}"}}

    def _handler_class(self) -> type:
        fake = self
        path = "/v1/chat/completions" if self.protocol == "openai" else "/v1/messages"

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
                data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if self.path != path:
                    return self._send(404, fake._error_body(404))
                user = body["messages"][-1]["content"]
                fault = fake._pick_fault(user)
                try:
                    self._respond(fault, body, user)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def _respond(self, fault: str | None, body: dict, user: str) -> None:
                if fault == "429":
                    return self._send(429, fake._error_body(429), {"Retry-After": "1"})
                if fault == "429:ms":
                    return self._send(429, fake._error_body(429), {"retry-after-ms": "50"})
                if fault in ("500", "503", "401"):
                    return self._send(int(fault), fake._error_body(int(fault)))
                if fault == "slow":
                    time.sleep(fake.slow_s)
                text = "I'd rather not grade this one." if fault == "garbage" else fake.reply(user)
                return self._send(200, fake._ok_body(body, text))

        return Handler


KEY_ENV = "MO_TEST_JUDGE_KEY"
SECRET = "sk-test-7f3a9c1e5b2d8f4a6c0e9b7d"  # must never appear in runs/, the study, artifacts or logs
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: 256 byte tokens + <s> </s> <pad>; encodes any text (Japanese too)."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    # Plain encoding prepends BOS, as Llama/Mistral tokenizers do.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out.chat_template = chat_template
    return out


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return MistralForCausalLM(cfg).eval()


def judge_cfg(server: FakeJudgeServer, **kw) -> JudgeConfig:
    """A judge pointed at a fake server, with fast retries (the tests check delays, not wall time)."""
    base = dict(kind=server.protocol, model="fake-judge", base_url=server.base_url, api_key_env=KEY_ENV,
                parallel=4, timeout=0.4, max_retries=3, backoff_base=0.01, backoff_max=0.05, jitter=0.5,
                retry_after_max=5.0)
    return JudgeConfig(**{**base, **kw})


def bench_cfg(tmp_path, **kw) -> MtBenchConfig:
    base = dict(bench_dir="data/mt_bench/en", max_new_tokens=6, batch_size=8,
                cache_path=str(tmp_path / "runs" / ".judge_cache.sqlite"))
    return MtBenchConfig(**{**base, **kw})

"""The real openai / anthropic SDKs against fake servers on 127.0.0.1: replies, retries, faults, keys."""

import pytest
from judge_fakes import KEY_ENV, SECRET, judge_cfg

from optimizer import UserError
from optimizer.eval.judge.clients import AnthropicJudge, OpenAIJudge
from optimizer.eval.judge.retry import JudgeCallError

CLIENTS = {"openai": OpenAIJudge, "anthropic": AnthropicJudge}


@pytest.fixture(params=["openai", "anthropic"])
def server(request, openai_server, anthropic_server):
    return openai_server if request.param == "openai" else anthropic_server


def _judge(server, **kw):
    slept = []
    judge = CLIENTS[server.protocol](judge_cfg(server, **kw), sleep=slept.append)
    return judge, slept


def test_reply_and_usage(server, judge_key):
    judge, _ = _judge(server)
    got = judge.complete("be fair", "[Question]\nq\n[Answer]\na")
    assert "[[7]]" in got.text and got.tokens_in > 0 and got.tokens_out > 0
    req = server.requests[-1]
    body, headers = req["body"], {k.lower(): v for k, v in req["headers"].items()}
    assert body["model"] == "fake-judge" and body["temperature"] == 0.0  # judge_cfg sets 0.0
    if server.protocol == "openai":
        assert body["messages"][0] == {"role": "system", "content": "be fair"} and body["max_tokens"] == 1024
        assert headers["authorization"] == f"Bearer {SECRET}"
    else:
        assert body["system"] == "be fair" and body["max_tokens"] == 1024
        # the SDK sends the key as x-api-key or (recent versions) as a bearer token
        assert SECRET in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer "))
    assert judge.stats.requests == 1 and judge.stats.retries == 0


@pytest.mark.parametrize("faults,min_wait", [(["429"], 1.0), (["429:ms"], 0.05), (["500", "503"], 0.0),
                                             (["slow"], 0.0)])
def test_transient_faults_are_retried_with_backoff(server, judge_key, faults, min_wait):
    judge, slept = _judge(server)
    server.faults.extend(faults)
    got = judge.complete("", "q")
    assert "[[7]]" in got.text
    assert server.calls == len(faults) + 1 and judge.stats.retries == len(faults) == len(slept)
    assert slept[0] >= min_wait  # Retry-After honoured (never earlier than asked)
    for attempt, delay in enumerate(slept):  # exponential backoff with jitter (base 0.01, cap 0.05)
        assert delay >= min(0.05, 0.01 * 2 ** attempt) * 0.5


def test_retries_run_out_and_permanent_errors_stop(server, judge_key):
    judge, slept = _judge(server, max_retries=2)
    server.faults.extend(["500"] * 5)
    with pytest.raises(JudgeCallError, match="HTTP 500 after 3 attempts"):
        judge.complete("", "q")
    assert server.calls == 3 and len(slept) == 2
    server.faults.clear()
    server.faults.append("401")
    with pytest.raises(JudgeCallError, match=f"401.*{KEY_ENV}") as e:
        judge.complete("", "q")
    assert server.calls == 4 and SECRET not in str(e.value)


def test_key_read_from_env_at_call_time(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    judge, _ = _judge(server)
    with pytest.raises(UserError, match=KEY_ENV):
        judge.complete("", "q")
    assert server.calls == 0
    keyless, _ = _judge(server, api_key_env=None)
    assert "[[7]]" in keyless.complete("", "q").text

"""Fixtures of the judge tests: a tiny random Mistral, fake judge servers, ready evaluators."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Helpers live in judge_fakes (a unique module name: tests/conftest.py is also called "conftest").
sys.path.insert(0, str(Path(__file__).parent))
from judge_fakes import KEY_ENV, SECRET, FakeJudgeServer, bench_cfg, build_model, build_tokenizer, judge_cfg  # noqa: E402

from optimizer.eval.judge.evaluator import MtBenchEvaluator  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny matmuls on a shared 2-core machine: a second OpenMP thread only spins (measured 12 ms vs 0.06 ms
    # per layer call under load). Restored afterwards so other test folders keep their setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_lm():
    tok = build_tokenizer()
    return build_model(tok), tok


@pytest.fixture
def judge_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def _server(protocol):
    srv = FakeJudgeServer(protocol).start()
    yield srv
    srv.stop()


@pytest.fixture
def openai_server():
    yield from _server("openai")


@pytest.fixture
def anthropic_server():
    yield from _server("anthropic")


@pytest.fixture
def make_evaluator(tmp_path):
    """(server, judge overrides, bench overrides) -> a validated MtBenchEvaluator writing under tmp_path/runs."""
    made = []

    def make(server: FakeJudgeServer, judge: dict | None = None, **bench) -> MtBenchEvaluator:
        ev = MtBenchEvaluator(bench_cfg(tmp_path, **bench), judge_cfg(server, **(judge or {})),
                              device=torch.device("cpu"), run_dir=tmp_path / "runs" / "study")
        ev.validate()
        made.append(ev)
        return ev

    yield make
    for ev in made:
        ev.close()

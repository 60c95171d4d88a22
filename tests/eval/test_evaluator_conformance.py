"""Every registered evaluator against the `Evaluator` protocol (optimizer/eval/base.py), in the style of
`optuna.testing`: one suite, parametrized over the registry, so a new evaluator is checked the day it is
registered (the suite fails until it has a CASE here).

The protocol's members are what the runner calls directly: `name`, `weights`, `chunk_size`, `splits`,
`validate`, `evaluate` (with `on_item` per-item reports that may raise `optuna.TrialPruned`) and `close`.
Models: the demo zoo's base and kana expert (real lm-eval tasks, a chat template for the judge) or, for the
toy evaluator, the tiny models of tests/conftest.py. The judge is a fake OpenAI server whose rating depends
on what it is shown, so answers that differ are rated differently.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import optuna
import pytest
import torch
from omegaconf import OmegaConf

from optimizer import UserError
from optimizer.eval import EVALUATORS, Evaluator, Scores, build_evaluator, load_plugins
from optimizer.eval.base import SEARCH, SPLITS
from optimizer.resources import CONF_DIR

sys.path.insert(0, str(Path(__file__).parent / "judge"))
from judge_fakes import KEY_ENV, SECRET, FakeJudgeServer, judge_cfg  # noqa: E402

load_plugins()  # the registry as a run sees it (lm_eval, composite, mt_bench, and the test evaluators)


def zoo_lm_eval(**kw) -> dict:
    """The shipped `evaluator=zoo` preset, on 8 items per task, reported in chunks of 4."""
    node = OmegaConf.load(CONF_DIR / "evaluator" / "zoo.yaml")
    return {**OmegaConf.to_container(node, resolve=True), "limit": 8, "chunk_size": 4, **kw}


def mt_bench(**kw) -> dict:
    return {"name": "mt_bench", "bench_dir": "data/mt_bench/en", "max_new_tokens": 4, "batch_size": 4,
            "limit": 4, "heldout_share": 0.5, "cache": False, **kw}


# name -> (config, bad config or None, which models: "zoo" or "tiny")
CASES = {
    "lm_eval": (zoo_lm_eval(), zoo_lm_eval(tasks=[]), "zoo"),
    "composite": ({"name": "composite", "parts": {"lm": zoo_lm_eval(), "fit": {"name": "lm_toy"}},
                   "part_weights": {"lm": 0.7, "fit": 0.3}},
                  {"name": "composite", "parts": {}}, "zoo"),
    "mt_bench": (mt_bench(), mt_bench(bench_dir="no/such/bench"), "zoo"),
    "toy": ({"name": "toy"}, {"name": "toy", "fail_validate": True}, "tiny"),
    "lm_toy": ({"name": "lm_toy"}, None, "zoo"),
}
NAMES = sorted(EVALUATORS)


def rating(user: str) -> str:
    """A judge whose verdict depends on the prompt (so on the answer in it)."""
    return f"Fine.\nRating: [[{1 + sum(map(ord, user)) % 10}]]"


@pytest.fixture(scope="module")
def judge_server():
    srv = FakeJudgeServer("openai", reply=rating).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def zoo_models():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.zoo import ensure_zoo

    root = ensure_zoo()
    tok = AutoTokenizer.from_pretrained(root / "base")
    return [(AutoModelForCausalLM.from_pretrained(root / n).eval(), tok) for n in ("base", "kana")]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    return [(AutoModelForCausalLM.from_pretrained(tiny_models[n]).eval(), tok) for n in ("base", "a")]


class Case:
    """build(node) -> evaluator; good / bad nodes; models: [(model, tokenizer), (another, tokenizer)];
    judge: the `judge` node a run needs for mt_bench."""

    def __init__(self, build, good, bad, models, judge):
        self.build, self.good, self.bad, self.models, self.judge = build, good, bad, models, judge


@pytest.fixture
def case(request, judge_server, tiny_models, tmp_path, monkeypatch) -> Case:
    name = request.param
    if name not in CASES:
        pytest.fail(f"evaluator {name!r} is registered but has no CASE in {__file__}: add one")
    good, bad, models = CASES[name]
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge = asdict(judge_cfg(judge_server))
    root = OmegaConf.create({"judge": judge})
    context = {"device": torch.device("cpu"), "run_dir": tmp_path / "runs" / "c", "seed": 0, "cfg": root}
    if name == "toy":
        good = {**good, "paths": {k: str(tiny_models[k]) for k in ("base", "a", "b")}}

    def build(node):
        return build_evaluator(OmegaConf.create(node), context)

    return Case(build, good, bad, request.getfixturevalue("zoo_models" if models == "zoo" else "tiny"), judge)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_members(case, request):
    ev = case.build(case.good)
    assert isinstance(ev, Evaluator)
    assert ev.name == request.node.callspec.params["case"]
    weights = ev.weights
    assert isinstance(weights, dict) and weights
    assert all(isinstance(k, str) and _finite(v) and v >= 0 for k, v in weights.items())
    assert sum(weights.values()) > 0
    assert isinstance(ev.chunk_size, int) and ev.chunk_size >= 0
    splits = ev.splits()
    assert isinstance(splits, tuple) and splits[0] == SEARCH
    assert set(splits) <= set(SPLITS) and len(set(splits)) == len(splits)
    assert ev.validate() is None
    ev.close()


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_bad_config_is_a_user_error_before_any_evaluation(case):
    if case.bad is None:
        pytest.skip("this evaluator takes no options, so no config of it is invalid")
    with pytest.raises(UserError):
        case.build(case.bad).validate()


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_evaluate_every_split(case):
    ev = case.build(case.good)
    ev.validate()
    (model, tok), (other, other_tok) = case.models
    for split in ev.splits():
        scores = ev.evaluate(model, tok, split)
        assert isinstance(scores, Scores)
        assert set(scores.tasks) == set(ev.weights)  # the default objective weights exactly these
        assert all(_finite(v) for v in scores.tasks.values())
        assert all(_finite(v) for v in scores.metrics.values())
        assert all(isinstance(v, list) and all(_finite(x) for x in v) for v in scores.items.values())
        json.dumps(scores.info)  # recorded as Optuna user attrs: must be JSON
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in scores.artifacts.items())
        again = ev.evaluate(model, tok, split)
        assert again.tasks == scores.tasks  # the same weights score the same
    # a different model scores differently (an evaluator that ignores the weights fails here)
    assert ev.evaluate(other, other_tok, SEARCH).tasks != ev.evaluate(model, tok, SEARCH).tasks
    ev.close()


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_per_item_reports(case):
    ev = case.build(case.good)
    ev.validate()
    if ev.chunk_size == 0:
        pytest.skip("chunk_size 0: no per-item reports, so per-item pruners are refused (session.prepare)")
    model, tok = case.models[0]
    seen: list[tuple[str, int, float]] = []
    whole = ev.evaluate(model, tok, SEARCH, on_item=lambda t, i, v: seen.append((t, i, v)))
    assert seen and {t for t, _, _ in seen} <= set(ev.weights)
    for task in {t for t, _, _ in seen}:
        idx = [i for t, i, _ in seen if t == task]
        assert idx == list(range(len(idx)))  # each task's items in a fixed order, each once
        if task in whole.items:
            assert [v for t, _, v in seen if t == task] == pytest.approx(whole.items[task])
    repeat: list[tuple[str, int, float]] = []
    ev.evaluate(model, tok, SEARCH, on_item=lambda t, i, v: repeat.append((t, i, v)))
    assert repeat == seen  # same order and values every trial: the pruner compares item by item

    calls = []

    def prune(task, index, value):
        calls.append(index)
        if len(calls) == ev.chunk_size:
            raise optuna.TrialPruned("stop")

    with pytest.raises(optuna.TrialPruned):
        ev.evaluate(model, tok, SEARCH, on_item=prune)
    assert len(calls) == ev.chunk_size  # nothing scored is reported after the pruner said stop
    ev.close()


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_drives_a_study(case, tiny_models, tmp_path):
    """The runner uses the evaluator through the protocol only: a two-trial study with export."""
    from optimizer.config import Config
    from optimizer.runner import run
    from optimizer.zoo import ensure_zoo

    cfg = OmegaConf.structured(Config)
    if case.good["name"] == "toy":
        cfg.models.base = str(tiny_models["base"])
        cfg.models.models = {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])}
    else:
        zoo = ensure_zoo()
        cfg.models.base = str(zoo / "base")
        cfg.models.models = {"kana": str(zoo / "kana"), "rev": str(zoo / "rev")}
    cfg.evaluator, cfg.judge = case.good, case.judge
    cfg.merge.baselines = [{"weight": 0.5}]
    cfg.run_root, cfg.study_name, cfg.device, cfg.n_trials = str(tmp_path / "runs"), "ev", "cpu", 2
    cfg.sampler.name = "random"
    cfg.export.references = False
    assert run(cfg) == 0
    report = json.loads((tmp_path / "runs" / "ev" / "best" / "scores.json").read_text())
    assert set(report["best"]["search"]["tasks"]) == set(case.build(case.good).weights)

"""Config schema, YAML files, registry factory and the checks validate() makes before the first trial."""

import pytest
import torch
from judge_fakes import KEY_ENV, bench_cfg, judge_cfg
from omegaconf import OmegaConf

from optimizer import UserError
from optimizer.eval import build_evaluator
from optimizer.eval.judge.config import JudgeConfig, MtBenchConfig, parse_node
from optimizer.eval.judge.evaluator import MtBenchEvaluator
from optimizer.resources import CONF_DIR

CONF = CONF_DIR


def _context(tmp_path, judge_yaml="openai", **judge_over):
    judge = OmegaConf.merge(OmegaConf.load(CONF / "judge" / f"{judge_yaml}.yaml"), judge_over)
    return {"device": torch.device("cpu"), "run_dir": tmp_path / "runs" / "s", "seed": 0,
            "cfg": OmegaConf.create({"judge": judge})}


def test_yaml_files_match_the_schema_and_build_through_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-dummy")
    for name in ("openai", "anthropic", "local"):
        text = (CONF / "judge" / f"{name}.yaml").read_text()
        assert text.startswith("# python -m optimizer")
        node = OmegaConf.merge(OmegaConf.create(text), {"model": "org/judge"} if name == "local" else {})
        assert parse_node(JudgeConfig, node, "judge").kind == name
    ev_node = OmegaConf.load(CONF / "evaluator" / "mt_bench.yaml")
    assert (CONF / "evaluator" / "mt_bench.yaml").read_text().startswith("# python -m optimizer evaluator=mt_bench")
    ev = build_evaluator(ev_node, _context(tmp_path))
    assert isinstance(ev, MtBenchEvaluator) and ev.cfg == parse_node(MtBenchConfig, ev_node, "evaluator")
    ev.validate()  # the shipped defaults are valid as they stand
    assert ev.cache_path() == tmp_path / "runs" / ".judge_cache.sqlite"


def test_typos_and_bad_values_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="bench_dirr"):
        build_evaluator(OmegaConf.create({"name": "mt_bench", "bench_dirr": "x"}), _context(tmp_path))
    with pytest.raises(UserError, match="judge.paralel"):
        build_evaluator(OmegaConf.create({"name": "mt_bench"}), _context(tmp_path, paralel=3))
    with pytest.raises(UserError, match="max_new_tokens"):
        build_evaluator(OmegaConf.create({"name": "mt_bench", "max_new_tokens": "many"}), _context(tmp_path))
    with pytest.raises(UserError, match="judge.model"):  # local.yaml leaves the model mandatory
        build_evaluator(OmegaConf.create({"name": "mt_bench"}), _context(tmp_path, "local"))


def _validate(tmp_path, server=None, judge=None, **bench):
    class NoServer:
        protocol, base_url = "openai", None

    jc = judge_cfg(server or NoServer(), **(judge or {}))
    MtBenchEvaluator(bench_cfg(tmp_path, **bench), jc, device=torch.device("cpu"), run_dir=tmp_path / "r").validate()


@pytest.mark.parametrize("judge,bench,match", [
    ({}, {"bench_dir": "no/such/bench"}, "question.jsonl"),
    ({}, {"judge_prompts": "missing.jsonl"}, "Judge prompt file"),
    ({"kind": "gemini"}, {}, "judge.kind"),
    ({"parallel": 0}, {}, "judge.parallel"),
    ({"base_url": "http://me:secret@127.0.0.1:9/v1"}, {}, "credentials"),
    ({}, {"max_failed_share": 1.5}, "max_failed_share"),
    ({}, {"limit": 1}, "heldout split of the bench is empty"),
    ({}, {"heldout_ids": ["999"]}, "unknown question ids"),
    ({}, {"prompts": {"single": "nope"}}, "nope"),
    ({"kind": "local", "model": "./no/such/folder"}, {}, "neither a local model folder"),
])
def test_validate_rejects(tmp_path, judge_key, judge, bench, match):
    if "prompts" in bench:
        from optimizer.eval.judge.config import PromptNames

        bench["prompts"] = PromptNames(**bench["prompts"])
    with pytest.raises(UserError, match=match):
        _validate(tmp_path, judge=judge, **bench)


def test_missing_key_is_an_error_before_any_call(tmp_path, monkeypatch, openai_server):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(UserError, match=f"export {KEY_ENV}=") as e:
        _validate(tmp_path, openai_server)
    assert "api_key_env=null" in str(e.value) and openai_server.calls == 0
    _validate(tmp_path, openai_server, judge={"api_key_env": None})  # keyless local servers are fine

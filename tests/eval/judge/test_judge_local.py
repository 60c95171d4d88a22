"""judge=local: a transformers model on the run's device judges in batches (here a tiny random one)."""

import pytest
import torch
from judge_fakes import CHAT_TEMPLATE, bench_cfg, build_model, build_tokenizer

from optimizer.eval.base import EvaluationFailed
from optimizer.eval.judge.config import JudgeConfig
from optimizer.eval.judge.evaluator import MtBenchEvaluator
from optimizer.eval.judge.local_judge import LocalJudge


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("local_judge")
    tok = build_tokenizer(CHAT_TEMPLATE)
    build_model(tok, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_local_judge_generates_batched_judgments(judge_dir):
    judge = LocalJudge(JudgeConfig(kind="local", model=str(judge_dir), api_key_env=None, max_tokens=5,
                                   batch_size=3), torch.device("cpu"))
    out = judge.complete_batch([("system", "user one"), ("", "user two")])
    assert len(out) == 2 and all(c.tokens_in > 0 and c.tokens_out <= 5 for c in out)
    assert judge.stats.requests == 2 and judge.model_id == f"local:{judge_dir}"


def test_local_judge_in_the_evaluator(tiny_lm, judge_dir, tmp_path):
    model, tok = tiny_lm
    jc = JudgeConfig(kind="local", model=str(judge_dir), api_key_env=None, max_tokens=4, batch_size=4)
    ev = MtBenchEvaluator(bench_cfg(tmp_path, limit=3, heldout_share=0.0), jc, device=torch.device("cpu"),
                          run_dir=tmp_path / "runs" / "s")
    ev.validate()
    # a random judge writes no [[rating]]: every judgment is excluded and counted, and the trial FAILs unscored
    with pytest.raises(EvaluationFailed, match=r"6/6 judgments failed.*no \[\[rating\]\]") as e:
        ev.evaluate(model, tok, "search")
    assert e.value.info["judge_requests"] == 6 and e.value.info["judge_new"] == 6
    ev.close()


def test_zoo_reference_works_as_judge_model(judge_dir, tmp_path, monkeypatch):
    """`judge.model=zoo://base` resolves like `models.base=zoo://base` (here a stand-in zoo folder)."""
    import json
    import shutil

    from optimizer import UserError
    from optimizer.eval.judge.local_judge import check_local_model
    from optimizer.zoo.layout import MANIFEST, RECIPE_VERSION

    zoo = tmp_path / "zoo"
    shutil.copytree(judge_dir, zoo / "base")
    (zoo / MANIFEST).write_text(json.dumps({"recipe_version": RECIPE_VERSION}))
    monkeypatch.setenv("MERGE_OPTIMIZER_ZOO", str(zoo))
    cfg = JudgeConfig(kind="local", model="zoo://base", api_key_env=None, max_tokens=3)
    check_local_model(cfg)
    judge = LocalJudge(cfg, torch.device("cpu"))
    assert len(judge.complete_batch([("", "rate this")])) == 1 and judge.model_id == "local:zoo://base"
    with pytest.raises(UserError, match="unknown zoo model 'zoo://nope'"):
        check_local_model(JudgeConfig(kind="local", model="zoo://nope", api_key_env=None))

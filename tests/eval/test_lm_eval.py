"""lm-eval evaluator on a local task: splits, limits, chunked per-item reporting, guards, bad names."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, MistralForCausalLM

from optimizer import UserError
from optimizer.eval.lm_eval import build
from optimizer.zoo import TASKS_DIR

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    search: {dir}/search.jsonl
    heldout: {dir}/heldout.jsonl
    test: {dir}/heldout.jsonl
test_split: {default_split}
output_type: multiple_choice
doc_to_text: "{{{{q}}}}="
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    for split, n in (("search", 12), ("heldout", 9)):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(n):
                a, b = i % 5, (i * 3) % 7
                f.write(json.dumps({"q": f"{a}+{b}", "choices": [str(a + b), str(a + b + 1), "x"],
                                    "label": 0}) + "\n")
    (d / "toy_mc.yaml").write_text(TASK.format(name="toy_mc", dir=d, default_split="search"))
    (d / "toy_mc_t.yaml").write_text(TASK.format(name="toy_mc_t", dir=d, default_split="test"))
    return d


@pytest.fixture(scope="module")
def live(tiny_models):
    model = MistralForCausalLM.from_pretrained(tiny_models["base"]).eval()
    return model, AutoTokenizer.from_pretrained(tiny_models["base"])


def evaluator(task_dir, **kw):
    node = OmegaConf.create({"name": "lm_eval", "include_path": [str(task_dir)], "batch_size": 8,
                             "max_length": 64, **kw})
    return build(node, {"device": torch.device("cpu")})


def test_search_and_heldout_splits(task_dir, live):
    ev = evaluator(task_dir, tasks=[{"name": "toy_mc", "search_split": "search", "heldout_split": "heldout"}])
    ev.validate()
    s = ev.evaluate(*live, "search")
    h = ev.evaluate(*live, "heldout")
    assert len(s.items["toy_mc"]) == 12 and len(h.items["toy_mc"]) == 9
    assert s.tasks["toy_mc"] == pytest.approx(sum(s.items["toy_mc"]) / 12)
    assert set(h.items["toy_mc"]) <= {0.0, 1.0}  # acc per item, and the task score is their mean
    assert h.tasks["toy_mc"] == pytest.approx(sum(h.items["toy_mc"]) / 9)


def test_per_task_limit(task_dir, live):
    ev = evaluator(task_dir, tasks=[{"name": "toy_mc", "search_split": "search", "limit": 5}])
    assert len(ev.evaluate(*live, "search").items["toy_mc"]) == 5


def test_chunked_reporting_matches_one_pass(task_dir, live):
    tasks = [{"name": "toy_mc", "search_split": "search"}]
    whole = evaluator(task_dir, tasks=tasks).evaluate(*live, "search")
    seen = []
    chunked = evaluator(task_dir, tasks=tasks, chunk_size=5).evaluate(
        *live, "search", on_item=lambda t, i, v: seen.append((t, i, v)))
    assert [i for _, i, _ in seen] == list(range(12))
    assert chunked.items["toy_mc"] == whole.items["toy_mc"]
    assert chunked.tasks["toy_mc"] == pytest.approx(whole.tasks["toy_mc"])


def test_searching_the_test_split_is_refused(task_dir):
    with pytest.raises(UserError, match="allow_test_split"):
        evaluator(task_dir, tasks=[{"name": "toy_mc_t"}]).validate()
    with pytest.raises(UserError, match="'test' split"):
        evaluator(task_dir, tasks=[{"name": "toy_mc", "search_split": "test"}]).validate()
    evaluator(task_dir, tasks=[{"name": "toy_mc_t"}], allow_test_split=True).validate()


def test_unknown_task_and_metric(task_dir, live):
    with pytest.raises(UserError, match="'toy_mcq' is not an lm-eval task"):
        evaluator(task_dir, tasks=["toy_mcq"]).validate()
    ev = evaluator(task_dir, tasks=[{"name": "toy_mc", "search_split": "search", "metric": "f1"}])
    with pytest.raises(UserError, match="metric 'f1' is not reported"):
        ev.evaluate(*live, "search")


def test_jglue_preset_resolves_to_installed_tasks():
    from hydra import compose, initialize_config_dir

    from optimizer.cli import CONF_DIR
    from optimizer.config import register_configs
    from optimizer.eval.lm_eval import parse_config

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=["evaluator=jglue"])
    parsed = parse_config(cfg.evaluator)
    names = [t.name for t in parsed.tasks]
    assert names == ["ja_leaderboard_jcommonsenseqa", "ja_leaderboard_jnli", "ja_leaderboard_marc_ja",
                     "ja_leaderboard_jsquad"]
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    assert set(names) <= known
    assert all(t.search_split == "train" and t.heldout_split == "validation" for t in parsed.tasks)


def zoo_evaluator(**kw):
    from optimizer.resources import CONF_DIR

    node = OmegaConf.load(CONF_DIR / "evaluator" / "zoo.yaml")
    node.include_path = [str(TASKS_DIR)]
    for k, v in kw.items():
        node[k] = v
    return build(node, {"device": torch.device("cpu"), "seed": 0})


@pytest.fixture(scope="module")
def zoo_live():
    from optimizer.zoo import ensure_zoo

    zoo = ensure_zoo()
    return MistralForCausalLM.from_pretrained(zoo / "base").eval(), AutoTokenizer.from_pretrained(zoo / "base")


HINT = "Custom kwargs can be passed"


def test_zoo_runs_log_no_custom_dataset_hint(zoo_live, caplog, capfd):
    """lm-eval logs a `--metadata` hint for every task built from a Python function (the zoo's six); the
    evaluator drops exactly that record, on a first run and a rerun (a second evaluator in the process)."""
    import logging

    from lm_eval.tasks import TaskManager

    caplog.set_level(logging.WARNING, logger="lm_eval")  # the evaluator raises it to ERROR once it wraps a model
    TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(["zoo_add"])
    assert HINT in caplog.text  # what the test guards against really happens without the filter
    caplog.clear()
    capfd.readouterr()
    for _run in range(2):
        caplog.set_level(logging.WARNING, logger="lm_eval")
        ev = zoo_evaluator(limit=5)
        ev.validate()
        for split in ev.splits():
            ev.evaluate(*zoo_live, split)
        out = capfd.readouterr()
        assert HINT not in caplog.text and HINT not in out.err and HINT not in out.out
    from optimizer.eval.tasks import quiet_task_builds

    caplog.set_level(logging.WARNING, logger="lm_eval")
    with quiet_task_builds():  # other lm-eval warnings still get through
        logging.getLogger("lm_eval.api.task").warning("some other warning")
    assert "some other warning" in caplog.text

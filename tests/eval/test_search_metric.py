"""Search metrics: every registered one rises with the gold answer's likelihood; as a trial value on the search
split it replaces the task metric there only (held-out reports accuracy), from the same requests."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from optimizer import UserError
from optimizer.eval import search_metric as sm


@pytest.mark.parametrize("name", sorted(sm.SEARCH_METRICS))
def test_metric_rises_with_the_gold_likelihood(name):
    m = sm.SEARCH_METRICS[name]
    others = [-2.0, -3.5, -1.0]
    values = [m.choice([g, *others], [0]) for g in (-6.0, -2.5, -1.2, -0.9, 0.5)]
    assert values == sorted(values) and len(set(values)) == len(values)
    right, wrong = m.choice([-0.5, *others], [0]), m.choice([-1.5, *others], [0])
    assert right > wrong  # acc 1 (gold is the top choice) scores above acc 0
    cont = [m.continuation(ll, 4) for ll in (-9.0, -3.0, -0.1)]
    assert cont == sorted(cont) and len(set(cont)) == 3
    assert m.continuation(-4.0, 4) == pytest.approx(m.continuation(-2.0, 2))  # per token


def test_margin_and_prob_values():
    assert sm.SEARCH_METRICS["margin"].choice([-1.0, -3.0, -2.0], [0]) == pytest.approx(1.0)
    assert sm.SEARCH_METRICS["margin"].choice([-3.0, -1.0, -2.0], [0]) == pytest.approx(-2.0)
    assert sm.SEARCH_METRICS["margin"].choice([-3.0, -1.0, -2.0], [0, 1]) == pytest.approx(1.0)  # several golds
    p = sm.SEARCH_METRICS["prob"].choice([0.0, 0.0, 0.0, 0.0], [2])
    assert p == pytest.approx(0.25)
    assert sm.SEARCH_METRICS["prob"].continuation(0.0, 3) == 1.0


class _Task:
    multiple_input = 0

    def __init__(self, target, choices=("a", "b", "c")):
        self.target, self.choices = target, list(choices)

    def doc_to_choice(self, doc):
        return self.choices

    def doc_to_target(self, doc):
        return self.target


@pytest.mark.parametrize("target,gold", [(1, [1]), ("c", [2]), ([0, 2], [0, 2]), ("zz", []), (7, [])])
def test_gold_resolution_follows_lm_eval(target, gold):
    assert sm.gold_choices(_Task(target), {})[1] == gold


def test_check_names_the_key():
    with pytest.raises(UserError, match=r"evaluator.search_metric='marginal' is not a search metric"):
        sm.check("marginal", "t", "multiple_choice", "evaluator.search_metric")
    with pytest.raises(UserError, match=r"task 'gen' is a generate_until task"):
        sm.check("margin", "gen", "generate_until", "evaluator.tasks[0].search_metric")
    sm.check("margin", "t", "loglikelihood", "evaluator.search_metric")


@pytest.fixture(scope="module")
def zoo_live():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.zoo import ensure_zoo

    zoo = ensure_zoo()
    return AutoModelForCausalLM.from_pretrained(zoo / "kana").eval(), AutoTokenizer.from_pretrained(zoo / "kana")


def zoo_evaluator(**kw):
    from optimizer.eval.lm_eval import build
    from optimizer.resources import CONF_DIR
    from optimizer.zoo import TASKS_DIR

    node = OmegaConf.load(CONF_DIR / "evaluator" / "zoo.yaml")
    node.include_path = [str(TASKS_DIR)]
    node.merge_with(kw)
    return build(node, {"device": torch.device("cpu"), "seed": 0})


def test_zoo_search_metric_is_the_search_value_only(zoo_live):
    plain = zoo_evaluator(limit=20)
    plain.validate()
    ev = zoo_evaluator(limit=20, search_metric="margin")
    ev.validate()
    names = list(ev.weights)
    acc = plain.evaluate(*zoo_live, "search")
    s = ev.evaluate(*zoo_live, "search")
    assert set(s.tasks) == set(names)
    for t in names:
        assert s.tasks[t] == pytest.approx(s.metrics[f"{t}/margin"])
        assert s.items[t] == s.items[f"{t}/margin"] and len(s.items[t]) == 20
        assert s.info["reported_scores"][t] == acc.tasks[t] == s.metrics[f"{t}/acc"]
        assert s.items[f"{t}/acc"] == acc.items[t]
        assert acc.metrics[f"{t}/margin"] == s.metrics[f"{t}/margin"]  # exposed even when not the value
    kana = s.items["zoo_kana/margin"]
    assert [m > 0 for m in kana] == [a == 1.0 for a in s.items["zoo_kana/acc"]]
    h = ev.evaluate(*zoo_live, "heldout")
    assert h.tasks == plain.evaluate(*zoo_live, "heldout").tasks and "reported_scores" not in h.info


def test_zoo_search_metric_per_task_and_chunked_reports(zoo_live):
    ev = zoo_evaluator(limit=12, chunk_size=5, tasks=[
        {"name": "zoo_add", "search_split": "search", "heldout_split": "heldout", "search_metric": "prob"},
        {"name": "zoo_kana", "search_split": "search", "heldout_split": "heldout"}])
    ev.validate()
    seen: dict[str, list[float]] = {}
    s = ev.evaluate(*zoo_live, "search", on_item=lambda t, i, v: seen.setdefault(t, []).append(v))
    assert s.info["search_metric"] == {"zoo_add": "prob"}
    assert seen["zoo_add"] == s.items["zoo_add"] == s.items["zoo_add/prob"]
    assert seen["zoo_kana"] == s.items["zoo_kana/acc"]
    whole = zoo_evaluator(limit=12, tasks=[{"name": "zoo_kana", "search_split": "search"}])
    whole.validate()
    assert whole.evaluate(*zoo_live, "search").tasks["zoo_kana"] == s.tasks["zoo_kana"]


def test_zoo_search_metric_validated_before_any_trial():
    with pytest.raises(UserError, match=r"evaluator.search_metric='nope'"):
        zoo_evaluator(search_metric="nope").validate()

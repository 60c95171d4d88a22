"""Gold answers from lm-eval's Task API and the gradient refiner: the differentiable merge is the real one,
refinement lowers the search loss, and methods it cannot differentiate are refused."""

import json

import optuna
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, MistralForCausalLM

from optimizer.eval.lm_eval import build
from optimizer.merge.apply import Applier
from optimizer.merge.registry import METHODS
from optimizer.models import ModelSet
from optimizer.search.gold import (
    GoldItem,
    build_gold,
    evaluator_gold,
    item_scores,
    request_logprobs,
    task_means,
)
from optimizer.search.refine import MergeGraph, NotRefinable, refine, search_loss
from optimizer.space import SearchSpace, derive_layout

TASK = """task: toy_gold_{kind}
dataset_path: json
dataset_kwargs:
  data_files:
    search: {dir}/search.jsonl
    heldout: {dir}/heldout.jsonl
test_split: search
output_type: {kind}
doc_to_text: "{{{{q}}}}="
{target}
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
    d = tmp_path_factory.mktemp("gold_tasks")
    for split, n in (("search", 10), ("heldout", 6)):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(n):
                a, b = i % 5, (i * 3) % 7
                f.write(json.dumps({"q": f"{a}+{b}", "a": str(a + b),
                                    "choices": [str(a + b + 1), str(a + b), "x"], "label": 1}) + "\n")
    (d / "mc.yaml").write_text(TASK.format(kind="multiple_choice", dir=d,
                                           target='doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"'))
    (d / "ll.yaml").write_text(TASK.format(kind="loglikelihood", dir=d, target='doc_to_target: "{{a}}"'))
    return d


def lm_evaluator(task_dir):
    node = OmegaConf.create({"name": "lm_eval", "include_path": [str(task_dir)], "batch_size": 8, "max_length": 64,
                             "tasks": [{"name": f"toy_gold_{k}", "search_split": "search", "heldout_split": "heldout"}
                                       for k in ("multiple_choice", "loglikelihood")]})
    ev = build(node, {"device": torch.device("cpu"), "seed": 0})
    ev.validate()
    return ev


def test_gold_accuracy_is_what_lm_eval_scores(task_dir, tiny_models):
    ev = lm_evaluator(task_dir)
    for name in ("base", "a"):
        model = MistralForCausalLM.from_pretrained(tiny_models[name]).eval()
        tok = AutoTokenizer.from_pretrained(tiny_models[name])
        gold = evaluator_gold(ev, tok)
        assert [i.gold for i in gold.items if i.kind == "multiple_choice"] == [1] * 10
        with torch.no_grad():
            lp, greedy, gap = request_logprobs(model, gold)
        assert torch.equal(gap > 0, greedy)  # greedy decoding = every token's gap over the others positive
        acc = task_means(gold, item_scores(gold, lp, greedy)["acc"])
        want = ev.evaluate(model, tok, "search").tasks
        assert {k: float(v) for k, v in acc.items()} == pytest.approx(want)


def test_gold_never_reads_the_heldout_split(task_dir, tiny_models):
    ev = lm_evaluator(task_dir)
    with pytest.raises(ValueError, match="search split only"):
        evaluator_gold(ev, AutoTokenizer.from_pretrained(tiny_models["base"]), split="heldout")


def load_models(tiny_models, dtype="float32"):
    """(model set, resident tensors, live model, tokenizer) of the tiny base + experts a, b in `dtype`."""
    cfg = OmegaConf.create({"base": str(tiny_models["base"]), "models": {"a": str(tiny_models["a"]),
                            "b": str(tiny_models["b"])}, "target": None, "tokenizer": None, "dtype": dtype,
                            "allow_pickle": False, "trust_remote_code": False, "vocab_policy": "error"})
    models = ModelSet(cfg)
    resident = models.load_resident(torch.device("cpu"))
    live = models.load_live(torch.device("cpu"))
    return models, resident, live, models.load_tokenizer()


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return load_models(tiny_models)


def space_for(models, method="task_arithmetic", granularity="layer"):
    merge = OmegaConf.create({"method": method, "search": None, "params": {}, "bounds": {}, "log": {},
                              "baselines": []})
    return SearchSpace(METHODS[method], models.names, derive_layout(models.tensor_names, granularity), merge)


def toy_gold(tok):
    items = [GoldItem("add", i, ((f"{i}+{i}=", str(2 * i)),), 0, "loglikelihood") for i in range(1, 6)]
    items += [GoldItem("mc", i, tuple((f"{i}+1=", c) for c in (str(i + 2), str(i + 1), "z")), 1, "multiple_choice")
              for i in range(5)]
    return build_gold(items, tok, {"add": 1.0, "mc": 1.0})


@pytest.mark.parametrize("granularity", ["layer", "gradient:2", "all"])
def test_differentiable_merge_is_the_applied_merge(loaded, granularity):
    models, resident, live, _ = loaded
    space = space_for(models, granularity=granularity)
    params = {p.name: 0.1 + 0.05 * i for i, p in enumerate(space.params)}
    graph = MergeGraph(space, resident, params)
    tensors = graph.tensors(graph.initial())
    Applier(live, resident).apply(space.plan(params))
    live_params = dict(live.named_parameters())
    for name in resident.names:
        torch.testing.assert_close(tensors[name], live_params[name].detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("granularity", ["layer", "gradient:2"])
def test_chain_rule_gradient_equals_autograd_through_the_merge(loaded, granularity):
    """What refine() steps with (the merge written in place, dL/dtheta, then <dL/dtheta, e_i> per unit) is
    autograd's gradient through anchor + sum w e (MergeGraph.tensors + functional_call)."""
    models, resident, live, tok = loaded
    space = space_for(models, granularity=granularity)
    params = {p.name: 0.2 + 0.04 * i for i, p in enumerate(space.params)}
    graph = MergeGraph(space, resident, params)
    gold = toy_gold(tok)
    coef = graph.initial().requires_grad_(True)
    tensors = graph.tensors(coef)

    def functional(ids, mask):
        return torch.func.functional_call(live, tensors, args=(), kwargs={"input_ids": ids, "attention_mask": mask}).logits

    search_loss(functional, gold, "ce").backward()
    want = coef.grad.clone()
    named = dict(live.named_parameters())
    targets = {n: named[n] for n in resident.names}
    graph.write(graph.initial(), targets)
    for p in live.parameters():
        p.grad = None
    search_loss(lambda ids, mask: live(input_ids=ids, attention_mask=mask).logits, gold, "ce").backward()
    got = graph.coef_grad({n: targets[n].grad for n in resident.names})
    for p in live.parameters():
        p.grad = None
    assert want.abs().max() > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("loss", ["ce", "soft_acc", "entropy"])
def test_micro_batches_give_the_whole_batch_gradient(loaded, loss):
    """backward_loss in micro-batches of 3 items (tasks split across them) accumulates the same gradient and
    returns the same loss as one pass over the batch."""
    from optimizer.search.refine import backward_loss

    models, resident, live, tok = loaded
    gold = toy_gold(tok)
    gold.weights["mc"] = 3.0  # unequal task weights, and 5 + 5 items in micro-batches of 3
    params = [p for p in live.parameters()]

    def run(micro):
        for p in params:
            p.grad = None
        value = backward_loss(lambda ids, mask: live(input_ids=ids, attention_mask=mask).logits, gold, loss,
                              None, 1.0, micro)
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return value, grads

    whole, g_whole = run(0)
    parts, g_parts = run(3)
    assert parts == pytest.approx(whole, rel=1e-5)
    for a, b in zip(g_parts, g_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["ce", "prob", "soft_acc"])
def test_refinement_lowers_the_search_loss(loaded, loss):
    models, resident, live, tok = loaded
    space = space_for(models)
    gold = toy_gold(tok)
    start = space.baseline({"weight": 0.5})
    result = refine(space, resident, live, start, gold, steps=8, lr=0.2, batch_items=0, loss=loss)
    assert result.steps == 8
    assert result.losses[-1] < result.losses[0] - 1e-3
    assert result.params != start and all(0.0 <= v <= 1.5 for v in result.params.values())
    # the reported loss is the loss of the returned weights, recomputed independently
    graph = MergeGraph(space, resident, result.params)
    tensors = graph.tensors(graph.initial())

    def forward(ids, mask):
        return torch.func.functional_call(live, tensors, args=(), kwargs={"input_ids": ids, "attention_mask": mask}).logits

    with torch.no_grad():
        assert float(search_loss(forward, gold, loss)) == pytest.approx(result.losses[-1], rel=1e-4)


def test_refinement_keeps_the_bounds(loaded):
    models, resident, live, tok = loaded
    space = space_for(models)
    result = refine(space, resident, live, space.baseline({"weight": 0.5}), toy_gold(tok), steps=5, lr=5.0)
    assert all(0.0 <= v <= 1.5 for v in result.params.values())
    assert any(v in (0.0, 1.5) for v in result.params.values())


def test_bf16_models_are_refined_and_their_resident_tensors_kept(tiny_models):
    """A bf16 model set is linear in its weights too (the check must not compare bf16-rounded merges), the
    refiner lowers its loss, and neither the check nor the steps change the resident anchor or task vectors."""
    models, resident, live, tok = load_models(tiny_models, "bfloat16")
    before = {n: (resident.anchor[n].clone(), [d.clone() for d in resident.deltas[n]]) for n in resident.names}
    space = space_for(models)
    start = space.baseline({"weight": 0.5})
    MergeGraph(space, resident, start, check_only=True)  # raised NotRefinable before
    result = refine(space, resident, live, start, toy_gold(tok), steps=6, lr=0.2,
                    batch_items=0, loss="ce")
    assert result.losses[-1] < result.losses[0]
    for n, (anchor, deltas) in before.items():
        assert torch.equal(resident.anchor[n], anchor)
        assert all(torch.equal(a, b) for a, b in zip(resident.deltas[n], deltas, strict=True))


def test_methods_that_are_not_linear_in_their_weights_are_refused(loaded):
    models, resident, _, _ = loaded
    ties = space_for(models, "ties")
    with pytest.raises(NotRefinable, match="not linear"):
        MergeGraph(ties, resident, ties.baseline({"weight": 0.7, "density": 0.5}))
    dare = space_for(models, "dare_linear")
    with pytest.raises(NotRefinable, match="random masks"):
        MergeGraph(dare, resident, dare.baseline({"weight": 0.7, "density": 0.5}))


def lm_cfg(tiny_models, tmp_path, task_dir, n_trials, stages):
    from ..test_runner import make_cfg

    cfg = make_cfg(tiny_models, tmp_path, n_trials=n_trials, sampler={"name": "cmaes"},
                   search={"stages": stages, "refine": {"steps": 6, "lr": 0.2, "batch_items": 0}},
                   export={"enabled": False})
    cfg.evaluator = OmegaConf.create({"name": "lm_eval", "include_path": [str(task_dir)], "batch_size": 8,
                                      "max_length": 64, "tasks": [
                                          {"name": f"toy_gold_{k}", "search_split": "search", "heldout_split": "heldout"}
                                          for k in ("multiple_choice", "loglikelihood")]})
    return cfg


def test_refine_stage_is_a_scored_trial_of_the_study(tiny_models, tmp_path, task_dir):
    from optimizer.runner import run
    from optimizer.search import schedule as sch

    from ..test_runner import load

    cfg = lm_cfg(tiny_models, tmp_path, task_dir, 5, [{"name": "refine", "kind": "refine"}, {"name": "fine"}])
    assert run(cfg) == 0
    study = load(cfg)
    refined = study.trials[2]
    assert refined.user_attrs["stage"] == "refine" and refined.state == optuna.trial.TrialState.COMPLETE
    info = refined.user_attrs["refine"]
    assert info["steps"] == 6 and info["loss_end"] < info["loss_start"]
    start = study.trials[refined.user_attrs["refined_from"]]
    assert start.user_attrs.get("baseline") and start.value == max(t.value for t in study.trials[:2])
    assert refined.params != start.params and "scores" in refined.user_attrs
    assert [st.name for st in sch.recorded_plan(study)] == ["baselines", "refine", "fine"]
    assert [t.user_attrs["stage"] for t in study.trials[3:]] == ["fine", "fine"]
    assert run(cfg) == 0 and len(load(cfg).trials) == 5  # resumed at its total: nothing is refined again


def test_refine_that_cannot_run_gives_its_trial_to_the_next_stage(tiny_models, tmp_path, task_dir, monkeypatch):
    from optimizer.runner import run
    from optimizer.search import loop
    from optimizer.search import schedule as sch

    from ..test_runner import load

    calls = []

    def blocker(s):  # fine when the plan is made, refused when the stage starts (e.g. out of memory)
        calls.append(1)
        return None if len(calls) == 1 else "simulated failure"

    monkeypatch.setattr(loop, "refine_blocker", blocker)
    cfg = lm_cfg(tiny_models, tmp_path, task_dir, 5, [{"name": "refine", "kind": "refine"}, {"name": "fine"}])
    assert run(cfg) == 0
    study = load(cfg)
    assert [t.user_attrs["stage"] for t in study.trials] == ["baselines"] * 2 + ["fine"] * 3
    assert [(st.name, st.end) for st in sch.recorded_plan(study)] == [("baselines", 2), ("refine", 2), ("fine", 5)]
    assert "simulated failure" in study.user_attrs["search_notes"][-1]

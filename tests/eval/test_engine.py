"""The evaluation engine scores exactly what lm-eval's own `evaluate` scores, item by item, on the zoo tasks:
both splits, all three tasks, every item, a limit, a shuffled subset, chunked runs. With shared-context
scoring (the default: one context pass for the five kana choices) the log-likelihoods equal lm-eval's to
float rounding and every metric is identical; without it, bit for bit."""

from __future__ import annotations

import random

import pytest

from optimizer.eval.engine import Engine, merge_runs, prepare_task
from optimizer.zoo import TASKS_DIR, ZOO_TASKS, ZOO_TASKS_HELDOUT

SPLITS = {"search": ZOO_TASKS, "heldout": ZOO_TASKS_HELDOUT}


@pytest.fixture(scope="module")
def zoo():
    from optimizer.zoo import ensure_zoo

    return ensure_zoo()


@pytest.fixture(scope="module")
def lm(zoo):
    """HFLM around the zoo's kana expert (mixed right and wrong answers on every task)."""
    import logging

    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(zoo / "kana").eval()
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(zoo / "kana"), batch_size=64,
                max_length=128)


@pytest.fixture(scope="module")
def manager(zoo):
    from optimizer.eval.tasks import task_manager

    return task_manager([TASKS_DIR], [*ZOO_TASKS, *ZOO_TASKS_HELDOUT], metadata={"zoo_dir": str(zoo)})


def fresh(manager, names):
    from optimizer.eval.tasks import load_tasks

    return load_tasks(manager, list(names), "test")


def reference(lm, manager, names, **kw):
    """lm-eval's evaluate on freshly loaded tasks: (results, {task: {doc_id: sample}})."""
    from lm_eval.evaluator import evaluate

    tasks = fresh(manager, names)
    out = evaluate(lm, {"tasks": tasks, "groups": {}}, bootstrap_iters=0, log_samples=True, **kw)
    return out["results"], {t: {s["doc_id"]: s for s in out["samples"][t]} for t in names}


def engine_runs(lm, manager, names, orders, chunk=None, share=True):
    tasks = fresh(manager, names)
    prepared = [prepare_task(n, tasks[n], orders[n]) for n in names]
    engine = Engine(lm, share_context=share)
    longest = max(len(p) for p in prepared)
    step = chunk or longest
    runs: dict[str, list] = {n: [] for n in names}
    for start in range(0, longest, step):
        parts = [(p, range(start, min(start + step, len(p)))) for p in prepared if start < len(p)]
        for (p, _), run in zip(parts, engine.run(parts), strict=True):
            runs[p.name].append(run)
    return {n: merge_runs(r) for n, r in runs.items()}


def assert_same(results, samples, runs, orders, exact=True):
    for name, run in runs.items():
        assert [it.doc_id for it in run.items] == orders[name]
        for it in run.items:
            ref = samples[name][it.doc_id]
            assert {m: v for (m, _f), v in it.metrics.items()} == {m: ref[m] for m in ref["metrics"]}
            if exact:
                assert it.responses == [list(r) for r in ref["resps"]]  # log-likelihoods bit for bit
            else:
                assert [g for r in it.responses for _, g in r] == [g for r in ref["resps"] for _, g in r]
                got = [x for r in it.responses for x, _ in r]
                assert got == pytest.approx([x for r in ref["resps"] for x, _ in r], abs=1e-4)
        agg = run.aggregate()
        assert agg == {k: v for k, v in results[name].items() if k in agg}
        assert set(agg) == {k for k in results[name] if "," in k and "stderr" not in k}


@pytest.mark.parametrize("share", [False, True], ids=["lm-eval-scoring", "shared-context"])
@pytest.mark.parametrize("split", ["search", "heldout"])
def test_every_item_matches_lm_eval(lm, manager, split, share):
    names = SPLITS[split]
    results, samples = reference(lm, manager, names)
    orders = {n: sorted(samples[n]) for n in names}
    assert all(len(o) == 150 for o in orders.values())
    assert_same(results, samples, engine_runs(lm, manager, names, orders, share=share), orders, exact=not share)


def test_limit_matches_lm_eval(lm, manager):
    names = SPLITS["search"]
    results, samples = reference(lm, manager, names, limit=23)
    orders = {n: list(range(23)) for n in names}
    assert_same(results, samples, engine_runs(lm, manager, names, orders, share=False), orders)
    assert_same(results, samples, engine_runs(lm, manager, names, orders), orders, exact=False)


def test_shuffled_subset_in_chunks_matches_lm_eval(lm, manager):
    """A shuffled subset scored in chunks of 7: lm-eval scores the same docs (given sorted; an unsorted
    `samples` list makes it mislabel doc ids), the engine returns them in the shuffled order."""
    names = SPLITS["heldout"]
    orders = {}
    for n in names:
        order = list(range(150))
        random.Random(f"0/{n}").shuffle(order)
        orders[n] = order[:40]
    results, samples = reference(lm, manager, names, samples={n: sorted(o) for n, o in orders.items()})
    runs = engine_runs(lm, manager, names, orders, chunk=7)
    for name, run in runs.items():  # chunks batch other requests together: lls equal to float tolerance
        for it in run.items:
            ref = samples[name][it.doc_id]
            assert {m: v for (m, _f), v in it.metrics.items()} == {m: ref[m] for m in ref["metrics"]}
            got = [x for r in it.responses for x, _ in r]
            want = [x for r in ref["resps"] for x, _ in r]
            assert got == pytest.approx(want, abs=1e-4)
        assert run.aggregate()["acc,none"] == results[name]["acc,none"]


def test_requests_are_built_once(lm, manager, monkeypatch):
    """A second run re-scores the same Instance objects; nothing rebuilds or re-tokenises them."""
    names = SPLITS["search"]
    tasks = fresh(manager, names)
    prepared = [prepare_task(n, tasks[n], range(10)) for n in names]
    engine = Engine(lm)
    first = engine.run([(p, range(10)) for p in prepared])
    calls = []
    for p in prepared:
        monkeypatch.setattr(p.task, "build_all_requests", lambda **kw: calls.append("build"))
    monkeypatch.setattr(lm, "tok_encode", lambda *a, **k: calls.append("tokenize"))
    second = engine.run([(p, range(10)) for p in prepared])
    assert not calls
    assert [r.aggregate() for r in first] == [r.aggregate() for r in second]

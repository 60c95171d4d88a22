"""Held-out guard, noise, Pareto export, composite objectives and per-item pruning on the toy evaluator."""

import json

import optuna
import pytest
from omegaconf import OmegaConf

from optimizer import UserError
from optimizer.eval.base import Scores
from optimizer.objective import Objective
from optimizer.runner import run

from ..test_runner import load, make_cfg


def test_heldout_table_and_choice(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=8, export={"heldout_top_k": 4})
    assert run(cfg) == 0
    scores = json.loads((tmp_path / "runs/t/best/scores.json").read_text())
    table = scores["heldout_table"]
    # the top 4 by search, plus every baseline (re-scored on held-out whatever its search rank)
    assert [r["search_rank"] for r in table][:4] == [1, 2, 3, 4]
    assert {r["baseline"] for r in table} >= {"weight=1.0", "weight=0.5"}
    assert sorted(r["heldout_rank"] for r in table) == list(range(1, len(table) + 1))
    chosen = min(table, key=lambda r: r["heldout_rank"])
    assert scores["best"]["trial"] == chosen["trial"] and scores["best"]["chosen_by"] == "heldout"
    assert all(r["gap"] == pytest.approx(0.001) for r in table)  # the toy's held-out offset
    csv = (tmp_path / "runs/t/best/heldout_table.csv").read_text().splitlines()
    assert csv[0].startswith("trial,baseline,search,heldout") and len(csv) == len(table) + 1
    assert len(load(cfg).user_attrs["heldout"]) >= 4  # cached: a re-export does not re-evaluate


def test_noise_repeats(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=3, export={"repeats": 3})
    run(cfg)
    noise = json.loads((tmp_path / "runs/t/best/scores.json").read_text())["best"]["noise"]
    assert len(noise["values"]) == 3 and noise["sd"] == 0.0 and noise["random_sources"] == []


def test_two_objectives_export_a_pareto_front(tiny_models, tmp_path):
    objective = {"objectives": [{"name": "layer0", "weights": {"l0": 1.0}},
                                {"name": "layer1", "weights": {"l1": 1.0}}]}
    cfg = make_cfg(tiny_models, tmp_path, n_trials=10, objective=objective, sampler={"name": "nsga2"})
    assert run(cfg) == 0
    study = load(cfg)
    assert study.metric_names == ["layer0", "layer1"]
    doc = json.loads((tmp_path / "runs/t/pareto/pareto.json").read_text())
    assert {r["trial"] for r in doc["front"]} == {t.number for t in study.best_trials}
    for r in doc["front"]:
        assert (tmp_path / f"runs/t/pareto/trial_{r['trial']}/model.safetensors").exists()
        assert len(r["heldout"]["values"]) == 2


def test_composite_weights():
    class Ev:
        weights = {"a": 1.0, "b": 1.0}

    obj = Objective.from_config(OmegaConf.create({"objectives": [{"weights": {"a": 0.7, "b": 0.3}}]}), Ev())
    assert obj.value(Scores(tasks={"a": 1.0, "b": 0.0})) == pytest.approx(0.7)
    assert Objective.from_config(None, Ev()).value(Scores(tasks={"a": 1.0, "b": 0.0})) == pytest.approx(0.5)
    with pytest.raises(UserError, match="task 'c'"):
        Objective.from_config(OmegaConf.create({"objectives": [{"weights": {"c": 1.0}}]}), Ev())


def test_wilcoxon_prunes_clearly_worse_trials(tiny_models, tmp_path):
    # Baseline 0.5 is near the optimum; random weights in [1.0, 1.5] are far worse on every item.
    cfg = make_cfg(tiny_models, tmp_path, n_trials=8, pruner={"name": "wilcoxon", "kwargs": {"p_threshold": 0.1}},
                   merge={"baselines": [{"weight": 0.5}], "bounds": {"weight": [1.0, 1.5]}})
    cfg.evaluator.chunk_size = 10
    assert run(cfg) == 0
    states = [t.state for t in load(cfg).trials]
    assert states.count(optuna.trial.TrialState.PRUNED) >= 3
    pruned = [t for t in load(cfg).trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(t.user_attrs["pruned_after_items"] < 120 for t in pruned)  # stopped before the last item
    assert all(len(t.user_attrs["item_scores"]) == t.user_attrs["pruned_after_items"] for t in pruned)


def test_pruner_needs_per_item_reports(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=2, pruner={"name": "wilcoxon"})
    cfg.evaluator.chunk_size = 0
    with pytest.raises(UserError, match="chunk_size"):
        run(cfg)


def test_composite_evaluator_prefixes_and_weights(tiny_models, tmp_path):
    toy = {"name": "toy", "paths": {k: str(tiny_models[k]) for k in ("base", "a", "b")}}
    cfg = make_cfg(tiny_models, tmp_path, n_trials=3)
    cfg.evaluator = {"name": "composite", "parts": {"x": toy, "y": toy}, "part_weights": {"x": 0.7, "y": 0.3}}
    assert run(cfg) == 0
    t = load(cfg).trials[0]
    assert set(t.user_attrs["scores"]) == {"x/l0", "x/l1", "y/l0", "y/l1"}
    assert t.value == pytest.approx(sum(t.user_attrs["scores"].values()) / 4)  # identical parts: plain mean
    from optimizer.eval.composite import build

    ev = build(cfg.evaluator, {})
    assert ev.weights == pytest.approx({"x/l0": 0.35, "x/l1": 0.35, "y/l0": 0.15, "y/l1": 0.15})
    with pytest.raises(UserError, match="part_weights"):
        build({"name": "composite", "parts": {"x": toy}, "part_weights": {"z": 1.0}}, {})


def test_report_from_storage_alone(tiny_models, tmp_path):
    from optimizer.report import report

    cfg = make_cfg(tiny_models, tmp_path, n_trials=5)
    run(cfg)
    assert report(cfg) == 0
    md = (tmp_path / "runs/t/report/report.md").read_text()
    assert "# Study `t`" in md and "## Best trial" in md and "## References" in md and "Time per trial" in md
    summary = json.loads((tmp_path / "runs/t/report/report.json").read_text())
    assert summary["best"]["trial"] == load(cfg).best_trial.number
    assert (tmp_path / "runs/t/report/history.png").exists()
    with pytest.raises(UserError, match="no study 'nope'"):
        report(OmegaConf.merge(cfg, {"study_name": "nope", "storage": {"kind": "sqlite"}}))

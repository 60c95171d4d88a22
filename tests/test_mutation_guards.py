"""Tests written because a mutation of scripts/mutation_check.py survived the rest of the suite.

The held-out guard: the toy evaluator's held-out score is its search score minus a constant, so every
other test ranks trials identically on both splits and exporting `study.best_trial` instead of the best
held-out trial of the top-k went unnoticed. Here the held-out split has an optimum of its own (the sum of
both task vectors, the weight=1.0 baseline), so the guard has something to overrule.
"""

from __future__ import annotations

import json

import pytest
import torch

from optimizer.eval import EVALUATORS
from optimizer.eval.base import HELDOUT, Scores
from optimizer.runner import run

from .conftest import ToyEvaluator
from .test_runner import load, make_cfg


class HeldoutElsewhere(ToyEvaluator):
    """Search split: the toy's (optimum 0.3 a + 0.6 b). Held-out split: closeness to base + 1.0 a + 1.0 b."""

    name = "toy_heldout_elsewhere"

    def evaluate(self, model, tokenizer, split, *, on_item=None):
        if split != HELDOUT:
            return super().evaluate(model, tokenizer, split, on_item=on_item)
        from safetensors.torch import load_file

        params = dict(model.named_parameters())
        tasks = {}
        for i in (0, 1):
            n = self.NAME.format(i)
            sd = {k: load_file(str(v) + "/model.safetensors")[n].double() for k, v in self.cfg.paths.items()}
            target = sd["a"] + sd["b"] - sd["base"]
            w = params[n].detach().double().cpu()
            tasks[f"l{i}"] = 1.0 - float(((w - target) ** 2).mean().sqrt()) * 10
        return Scores(tasks=tasks)


@pytest.fixture
def heldout_elsewhere(monkeypatch):
    monkeypatch.setitem(EVALUATORS, HeldoutElsewhere.name, HeldoutElsewhere)
    return HeldoutElsewhere.name


def test_export_takes_the_best_heldout_trial_of_the_top_k(tiny_models, tmp_path, heldout_elsewhere):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=8, sampler={"name": "random"},
                   export={"heldout_top_k": 8, "references": False})
    cfg.evaluator.name = heldout_elsewhere
    assert run(cfg) == 0
    study = load(cfg)
    scores = json.loads((tmp_path / "runs/t/best/scores.json").read_text())
    summed = next(t for t in study.trials if t.user_attrs.get("baseline") == "weight=1.0")
    assert study.best_trial.number != summed.number  # precondition: search and held-out disagree
    assert scores["best"]["trial"] == summed.number and scores["best"]["chosen_by"] == "heldout"
    assert scores["best"]["heldout"]["objective"] == pytest.approx(1.0)  # the held-out optimum itself
    table = {r["trial"]: r for r in scores["heldout_table"]}
    assert table[summed.number]["heldout_rank"] == 1 and table[study.best_trial.number]["search_rank"] == 1
    from safetensors.torch import load_file

    name = ToyEvaluator.NAME.format(0)  # the folder written holds the chosen trial's weights
    base, a, b = (load_file(str(tiny_models[k] / "model.safetensors"))[name] for k in ("base", "a", "b"))
    best = load_file(str(tmp_path / "runs/t/best/model.safetensors"))[name]
    torch.testing.assert_close(best, a + b - base, rtol=1e-6, atol=1e-6)

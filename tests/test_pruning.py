"""The per-item Wilcoxon pruner decides exactly as Optuna's WilcoxonPruner fed one intermediate value per item."""

from __future__ import annotations

import random
import warnings

import optuna
import pytest

from optimizer.pruning import ITEMS, ItemWilcoxonPruner, with_items


def _studies(direction: str, kwargs: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        reference = optuna.create_study(direction=direction, pruner=optuna.pruners.WilcoxonPruner(**kwargs))
    ours = optuna.create_study(direction=direction, pruner=ItemWilcoxonPruner(**kwargs))
    return reference, ours


def _finish(study: optuna.Study, items: list[float], per_item: bool) -> None:
    t = study.ask()
    if per_item:
        for i, v in enumerate(items):
            t.report(v, i)
    else:
        t.set_user_attr(ITEMS, items)
    study.tell(t, sum(items) / len(items))


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
@pytest.mark.parametrize("kwargs", [{}, {"p_threshold": 0.1}, {"p_threshold": 0.3, "n_startup_steps": 5}])
def test_same_decisions_as_optunas_pruner(direction, kwargs):
    rng = random.Random(0)
    reference, ours = _studies(direction, kwargs)
    for _ in range(3):  # finished trials; the best one is the reference point
        items = [float(rng.random() < 0.7) for _ in range(60)]
        _finish(reference, items, True)
        _finish(ours, items, False)
    decisions = []
    for quality in (0.2, 0.5, 0.65, 0.7, 0.9):
        for n in (1, 2, 10, 30, 60):
            items = [float(rng.random() < quality) for _ in range(n)]
            a, b = reference.ask(), ours.ask()
            for i, v in enumerate(items):
                a.report(v, i)
            in_memory = ours.pruner.prune_items(ours, b.number, items)  # what the study loop asks
            b.set_user_attr(ITEMS, items)
            want, got = a.should_prune(), b.should_prune()
            assert got == want == in_memory, (quality, n)
            decisions.append(got)
            reference.tell(a, state=optuna.trial.TrialState.PRUNED)
            ours.tell(b, state=optuna.trial.TrialState.PRUNED)
    assert any(decisions) and not all(decisions)  # the cases do exercise both answers


def test_no_items_no_pruning():
    study = optuna.create_study(direction="maximize", pruner=ItemWilcoxonPruner())
    t = study.ask()
    assert not t.should_prune()  # no finished trial, no items
    _finish(study, [1.0] * 20, False)
    t = study.ask()
    assert not t.should_prune()  # this trial has no item scores yet
    study.add_trial(optuna.trial.create_trial(value=2.0))  # a best trial without item scores
    t = study.ask()
    t.set_user_attr(ITEMS, [0.0] * 20)
    assert not t.should_prune()


def test_with_items_copies():
    study = optuna.create_study()
    t = study.ask()
    t.set_user_attr(ITEMS, [0.5, 1.0])
    study.tell(t, 0.75)
    frozen = study.trials[0]
    view = with_items(frozen)
    assert view.intermediate_values == {0: 0.5, 1: 1.0}
    assert frozen.intermediate_values == {}  # the stored trial is not changed


def test_the_study_loop_checks_from_memory_and_writes_the_items_once(tiny_models, tmp_path, monkeypatch):
    """A pruned study: no storage write per pruning check; each trial stores its items once (a finished
    trial all of them, a stopped one those it scored)."""
    from optimizer.runner import run
    from tests.test_runner import load, make_cfg

    writes: list[str] = []
    real = optuna.trial.Trial.set_user_attr
    monkeypatch.setattr(optuna.trial.Trial, "set_user_attr",
                        lambda self, key, value: writes.append(key) or real(self, key, value))
    asked: list[int] = []
    real_prune = ItemWilcoxonPruner.prune_items
    monkeypatch.setattr(ItemWilcoxonPruner, "prune_items",
                        lambda self, study, number, items: asked.append(len(items))
                        or real_prune(self, study, number, items))
    cfg = make_cfg(tiny_models, tmp_path, n_trials=6, pruner={"name": "wilcoxon"})  # toy: 120 items, checks per 10
    assert run(cfg) == 0
    trials = load(cfg).trials
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(asked) >= 2 * len(trials)  # several checks per trial ...
    assert writes.count(ITEMS) == len(trials)  # ... but one write of the items per trial
    assert all(len(t.user_attrs[ITEMS]) == 120 for t in finished)

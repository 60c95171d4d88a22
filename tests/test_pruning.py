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
            b.set_user_attr(ITEMS, items)
            want, got = a.should_prune(), b.should_prune()
            assert got == want, (quality, n)
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

"""Per-item pruning without a storage write per item.

Optuna's `WilcoxonPruner` reads each item's score as one intermediate value (step = item), so a trial of 450
items made 450 `trial.report` calls, each a storage transaction (~2 ms on SQLite: as much as evaluating the
demo zoo). Here a running trial keeps its item scores in memory and the study loop asks the pruner directly
(`ItemWilcoxonPruner.prune_items`: no storage write or read per check, ~5 ms each on SQLite); a trial's item
scores are written once when it finishes or is stopped, as one user attr (`ITEMS`, a list in the study's
fixed item order): a finished trial's are what the trials after it (and other workers) compare with. `ItemWilcoxonPruner` hands Optuna's own
`WilcoxonPruner` copies of the current and the best trial whose intermediate values are those items: the
test and its safety rules are Optuna's, unchanged; only where the numbers live differs. `trial.should_prune()`
works too (it reads the `ITEMS` attr of the running trial, when something wrote it).
The best trial is looked up once per pruned trial (its first check), not at every check, and SciPy (the
test) is imported when the pruner is built, not inside the first trial that asks.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

ITEMS = "item_scores"  # user attr: the trial's per-item scores so far, in the study's item order


def with_items(trial: FrozenTrial) -> FrozenTrial | None:
    """A copy of `trial` whose intermediate values are its per-item scores (step = item), or None."""
    items = trial.user_attrs.get(ITEMS)
    if not items:
        return None
    out = copy.copy(trial)
    out.intermediate_values = {i: float(v) for i, v in enumerate(items)}
    return out


@dataclass(frozen=True)
class _Best:
    """What `WilcoxonPruner.prune` reads of a study: its direction and its best trial."""

    direction: StudyDirection
    best_trial: FrozenTrial


class ItemWilcoxonPruner(optuna.pruners.BasePruner):
    """Optuna's `WilcoxonPruner` (same arguments) on the per-item scores kept in the `ITEMS` user attr.

    Args:
        **kwargs: `p_threshold`, `n_startup_steps` of `optuna.pruners.WilcoxonPruner`.
    """

    def __init__(self, **kwargs: Any):
        import scipy.stats  # noqa: F401  (Optuna imports it lazily on the first test: ~1 s inside a trial)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.inner = optuna.pruners.WilcoxonPruner(**kwargs)
        self._best: tuple[int, FrozenTrial | None] | None = None  # (trial asking, the best trial with items)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self._decide(study, trial.number, with_items(trial))

    def prune_items(self, study: optuna.Study, number: int, items: list[float]) -> bool:
        """The decision for running trial `number` with these item scores so far, from memory (no storage
        read or write): a RUNNING snapshot carrying them is what Optuna's test reads."""
        if not items:
            return False
        mine = FrozenTrial(number=number, state=TrialState.RUNNING, value=None, datetime_start=None,
                           datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
                           intermediate_values={i: float(v) for i, v in enumerate(items)}, trial_id=number)
        return self._decide(study, number, mine)

    def _decide(self, study: optuna.Study, number: int, mine: FrozenTrial | None) -> bool:
        if mine is None:
            return False
        if self._best is None or self._best[0] != number:
            try:
                self._best = (number, with_items(study.best_trial))
            except ValueError:  # no finished trial yet
                return False
        theirs = self._best[1]
        if theirs is None:  # e.g. a trial added by hand, without item scores: nothing to compare with
            return False
        return bool(self.inner.prune(_Best(study.direction, theirs), mine))  # type: ignore[arg-type]

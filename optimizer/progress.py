"""Per-trial console progress: trial n/N, value, best so far, merge and evaluation seconds."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState
from rich.console import Console

from optimizer.session import Session


class Progress:
    """An Optuna callback printing one line per finished trial; stops the study after repeated failures."""

    def __init__(self, session: Session, total: int, console: Console):
        self.session = session
        self.total = total
        self.console = console
        self.failures = 0
        self.aborted: str | None = None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        attrs = trial.user_attrs
        tag = f" [dim]{attrs['baseline']}[/]" if "baseline" in attrs else ""
        times = f"merge {attrs.get('merge_seconds', 0):.2f}s eval {attrs.get('eval_seconds', 0):.2f}s"
        if trial.state == TrialState.FAIL:
            self.failures += 1
            reason = attrs.get("fail_reason", "see log")
            self.console.print(f"[{done:>3}/{self.total}] trial {trial.number} [red]FAILED[/]: {reason}")
            limit = self.session.cfg.max_failures
            if self.failures >= limit:
                self.aborted = (f"{self.failures} trials failed in a row (max_failures={limit}); the last "
                                f"reason: {reason}. Fix the cause and rerun the same command to resume.")
                study.stop()
            return
        self.failures = 0
        if trial.state == TrialState.PRUNED:
            self.console.print(f"[{done:>3}/{self.total}] trial {trial.number} pruned  {times}{tag}")
            return
        vals = trial.values or []
        value = " ".join(f"{v:.4f}" for v in vals)
        best = ""
        if len(study.directions) == 1:
            b = study.best_trial
            best = f"  best {b.value:.4f} (#{b.number})"
        self.console.print(f"[{done:>3}/{self.total}] trial {trial.number:>3}  value {value}{best}  {times}{tag}")

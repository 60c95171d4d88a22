"""Console output of a run: one line per finished trial, and at the end where the results are.

A failed trial is one line here (its reason); Optuna's own warning for it (the parameter dump and the
traceback of an `EvaluationFailed`) is filtered out, since the trial keeps the reason and the evaluator's
transcripts as user attrs and artifacts.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.markup import escape

from optimizer.eval import HELDOUT, EvaluationFailed
from optimizer.secrets import redact_text
from optimizer.session import Session
from optimizer.study import storage_url


class _ReportedFailures(logging.Filter):
    """Drops Optuna's "Trial N failed with parameters ... because of the following error" warning when the
    error is an EvaluationFailed (Progress prints it as one line), and the "Trial N failed with value None"
    warning Optuna logs right after it; any other error keeps its traceback."""

    _FIRST = re.compile(r"^Trial (\d+) failed with parameters")

    def __init__(self) -> None:
        super().__init__()
        self._follow_up: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, EvaluationFailed):
            first = self._FIRST.match(record.getMessage())
            self._follow_up = f"Trial {first.group(1)} failed with value" if first else None
            return False
        if self._follow_up and record.getMessage().startswith(self._follow_up):
            self._follow_up = None
            return False
        return True


_FILTER = _ReportedFailures()


def quiet_reported_failures() -> None:
    """Install the filter on the logger Optuna's optimize loop writes to (idempotent)."""
    logger = logging.getLogger("optuna.study._optimize")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


class Progress:
    """An Optuna callback printing one line per finished trial; stops the study after repeated failures.

    Args:
        session: the run (its cfg.max_failures).
        total: the number of finished trials the study should reach (n_trials).
        console: where lines go.
        done: finished trials when this run started; failures in a row stop the run after
            min(max_failures, total - done), so a run asked for 2 more trials never makes 5 failing tries.
    """

    def __init__(self, session: Session, total: int, console: Console, done: int = 0):
        self.session = session
        self.total = total
        self.console = console
        self.limit = max(1, min(int(session.cfg.max_failures), total - done))
        self.failures = 0
        self.aborted: str | None = None
        quiet_reported_failures()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        attrs = trial.user_attrs
        tag = f" [dim]{escape(attrs['baseline'])}[/]" if "baseline" in attrs else ""
        times = f"merge {attrs.get('merge_seconds', 0):.2f}s eval {attrs.get('eval_seconds', 0):.2f}s"
        if trial.state == TrialState.FAIL:
            self.failures += 1
            reason = attrs.get("fail_reason", "see the log above")
            self.console.print(f"[{done:>3}/{self.total}] trial {trial.number} [red]FAILED[/]: {escape(reason)}")
            if self.failures >= self.limit:
                limit = self.session.cfg.max_failures
                why = f"max_failures={limit}" if self.limit == limit else \
                    f"as many as the {self.limit} trials this run was asked for; max_failures={limit}"
                self.aborted = (f"{self.failures} trials failed in a row ({why}); the last reason: {reason}. "
                                "Fix the cause and rerun the same command to resume.")
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


def tool(name: str) -> str:
    """A console script of this environment by path (`.venv/bin/optuna-dashboard`) when it is installed
    next to the running interpreter, so the printed command works without an activated virtualenv."""
    path = Path(sys.executable).parent / name
    return str(path) if path.is_file() else name


def _held_out_line(scores: dict) -> str | None:
    best = scores.get("best") or {}
    held = (best.get(HELDOUT) or {}).get("objective")
    if not isinstance(held, (int, float)):
        return None
    line = f"held-out: trial {best['trial']} scores {held:.4f} (search {best['search']['objective']:.4f}"
    line += ", chosen by held-out score among the top trials)" if best.get("chosen_by") == HELDOUT else ")"
    base = ((scores.get("references") or {}).get("base") or {}).get(HELDOUT, {}).get("objective")
    expert = scores.get("best_expert") or {}
    alone = []
    if isinstance(base, (int, float)):
        alone.append(f"base {base:.4f}")
    if expert.get("name") and expert.get("split") == HELDOUT:
        alone.append(f"best expert {expert['name']} {expert['objective']:.4f}")
    return line + (f"; alone: {', '.join(alone)}" if alone else "")


def print_run_end(s: Session, console: Console) -> None:
    """Where the results are: held-out score of the export, scores.json, the report and dashboard commands."""
    cfg = s.cfg
    best = s.run_dir / "best" / "scores.json"
    pareto = s.run_dir / "pareto" / "pareto.json"
    if cfg.export.enabled and best.is_file():
        try:
            scores = json.loads(best.read_text(encoding="utf-8"))
            # The export's comparison table (printed before this) already shows the held-out scores.
            line = None if scores.get("comparison") else _held_out_line(scores)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            line = None
        if line:
            console.print(escape(line))
        console.print(f"scores:    {best} (search and held-out scores of the exported trial, the base, each "
                      "expert and the baselines)")
    elif cfg.export.enabled and pareto.is_file():
        console.print(f"scores:    {pareto} (search and held-out values of every Pareto-front trial)")
    args = [f"study_name={cfg.study_name}"]
    if str(cfg.run_root) != "runs":
        args.append(f"run_root={cfg.run_root}")
    if cfg.storage.kind != "sqlite":
        args.append(f"storage={cfg.storage.kind}")
    report = shlex.join([sys.executable, "-m", "optimizer.report", *args])
    console.print(f"report:    {escape(report)}   (writes {s.run_dir / 'report'}/report.md and plots)")
    url = storage_url(cfg.storage, s.run_dir)
    if url:
        # A server URL from an environment variable is named, not printed (it holds the password).
        from_env = cfg.storage.kind == "postgresql" and not cfg.storage.url
        shown = f'"${cfg.storage.url_env}"' if from_env else shlex.quote(redact_text(url))
        artifacts = shlex.quote(str((s.run_dir / "artifacts").resolve()))
        console.print(f"dashboard: {escape(shlex.quote(tool('optuna-dashboard')))} {escape(shown)} "
                      f"--artifact-dir {escape(artifacts)}")

"""Random kill -9 runs of one study, each followed by a rerun, on the demo zoo: prints what every kill did.

After one unkilled warm-up run (timings, and a best/ that later exports replace), each round starts the
worker with a higher `n_trials`, kills it with SIGKILL at a random point of a random
phase (start-up: a random time before its first trial; mid-trial: inside its first trial; export: while
the best model is scored and written), then checks the study and the run folder. A final run without a kill
finishes the study. Columns:

    lost      completed trials that are no longer COMPLETE after the kill (must be 0)
    running   trials the kill left RUNNING; `recovered`: how many the next start reported failing and
              re-enqueueing (0 when that start was itself killed first; a later start then recovers them)
    best/     the export after the kill: complete (every file), absent, or PARTIAL (must never happen)
    temps     `.best.tmp-*` / `.best.old-*` folders after the kill; `left` after the final run (must be 0)

The final line checks the issue's criteria: 0 lost, 0 stuck RUNNING, the exact total, a loadable and
current best/, no temp folders.

    python benchmarks/kill_runs.py                       # 20 kills on the demo zoo (10-40 min on 2 CPUs)
    python benchmarks/kill_runs.py --kills 5 --seed 1    # fewer
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("start-up", "mid-trial", "export")
EXPORT_FILES = ("config.json", "scores.json", "recipe.yaml", "tokenizer_config.json")
_PROGRESS = re.compile(r"^\[\s*(\d+)/(\d+)\] trial")


@dataclass
class Round:
    run: int
    phase: str
    target: int
    at: float = 0.0
    killed: bool = False
    completed_before: int = 0
    completed_after: int = 0
    lost: int = 0
    running: int = 0
    recovered: int = 0
    best: str = "absent"
    temps: int = 0
    last_line: str = ""


@dataclass
class Timing:
    """Seconds from launch to the first trial, per trial, and from the last trial to exit (as observed)."""

    startup: float = 20.0
    trial: float = 3.0
    export: float = 10.0
    seen: dict[str, list[float]] = field(default_factory=lambda: {"startup": [], "trial": [], "export": []})

    def learn(self, key: str, value: float) -> None:
        self.seen[key].append(value)
        setattr(self, key, sorted(self.seen[key])[len(self.seen[key]) // 2])


class Worker:
    """A study process whose stdout lines are collected with their times."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace")
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line.rstrip()))

    def wait_for(self, pattern: re.Pattern, timeout: float) -> float | None:
        """Time of the first line matching `pattern`; None if the process ended (or timed out) first."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for t, line in self.lines[seen:]:
                if pattern.search(line):
                    return t
            seen = len(self.lines)
            if self.proc.poll() is not None:
                time.sleep(0.1)
                if len(self.lines) == seen:
                    return None
            time.sleep(0.02)
        return None

    def sleep_until(self, t: float) -> bool:
        """Sleep until `t` seconds after launch; False if the process ended first."""
        while time.monotonic() - self.t0 < t:
            if self.proc.poll() is not None:
                return False
            time.sleep(0.01)
        return self.proc.poll() is None

    def kill(self) -> float:
        at = time.monotonic() - self.t0
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=5)
        return at

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=5)
        return code

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def progress_line(k: int, n: int) -> re.Pattern:
    """The runner's per-trial console line `[  k/n] trial ...`."""
    return re.compile(rf"^\[\s*{k}/{n}\] trial")


def study_state(storage_url: str, name: str) -> tuple[dict[int, float], int, int]:
    """(COMPLETE trial number -> value, RUNNING count, finished count)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if storage_url.startswith("sqlite:///") and not Path(storage_url.removeprefix("sqlite:///")).exists():
        return {}, 0, 0  # not created yet (and reading must not create it)
    try:
        study = optuna.load_study(study_name=name, storage=storage_url)
    except KeyError:
        return {}, 0, 0
    trials = study.get_trials(deepcopy=False)
    done = {t.number: t.value for t in trials if t.state.name == "COMPLETE"}
    return (done, sum(t.state.name == "RUNNING" for t in trials),
            sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials))


def export_state(run_dir: Path) -> tuple[str, int]:
    best = run_dir / "best"
    temps = [p for p in run_dir.glob(".best.*") if ".tmp-" in p.name or ".old-" in p.name]
    if not best.exists():
        return "absent", len(temps)
    ok = all((best / f).is_file() for f in EXPORT_FILES) and (
        (best / "model.safetensors").is_file() or (best / "model.safetensors.index.json").is_file())
    return ("complete" if ok else "PARTIAL"), len(temps)


def check_best(run_dir: Path, url: str, name: str) -> tuple[bool, bool]:
    """(best/ loads with transformers, best/ was written from the study as it is now)."""
    import optuna
    from transformers import AutoModelForCausalLM

    from optimizer.export.write import is_current

    AutoModelForCausalLM.from_pretrained(run_dir / "best")
    return True, is_current(run_dir / "best", optuna.load_study(study_name=name, storage=url))


def kill_round(cmd: list[str], env: dict[str, str], r: Round, rng: random.Random, timing: Timing) -> Worker:
    """Start the worker, kill it at a random point of `r.phase` (if it gets that far)."""
    w = Worker(cmd, env)
    last = progress_line(r.target, r.target)
    if r.phase == "start-up":
        alive = w.sleep_until(rng.uniform(0.5, max(timing.startup, 1.0)))
    elif r.phase == "mid-trial":
        started = w.wait_for(re.compile(r"finished trials, target"), 900)
        alive = started is not None and w.sleep_until(started + rng.uniform(0.05, 0.95) * timing.trial)
    else:
        t = w.wait_for(last, 1800)
        alive = t is not None and w.sleep_until(t + rng.uniform(0.3, 1.0) * timing.export)  # writes come last
    if alive:
        r.at = w.kill()
        r.killed = True
    else:
        w.finish(1800)
    r.last_line = w.lines[-1][1][:70] if w.lines else ""
    learn(w, timing, r.target)
    return w


def learn(w: Worker, timing: Timing, target: int) -> None:
    times = [t for t, line in w.lines if _PROGRESS.search(line)]
    study = next((t for t, line in w.lines if "finished trials, target" in line), None)
    if study is not None:
        timing.learn("startup", study)
    if len(times) >= 2:
        timing.learn("trial", (times[-1] - times[0]) / (len(times) - 1))
    end = next((t for t, line in w.lines if line.startswith("dashboard:")), None)
    last = next((t for t, line in w.lines if progress_line(target, target).search(line)), None)
    if end is not None and last is not None:
        timing.learn("export", end - last)


@dataclass
class Summary:
    rounds: list[Round]
    exit_code: int
    target: int
    finished: int
    lost: int
    running: int
    best: str
    loadable: bool
    current: bool
    temps: int

    @property
    def ok(self) -> bool:
        return (self.exit_code == 0 and self.lost == 0 and self.running == 0 and self.finished == self.target
                and self.loadable and self.current and self.temps == 0
                and not any(r.best == "PARTIAL" for r in self.rounds))


def kill_loop(command: Callable[[int], list[str]], url: str, study: str, run_dir: Path, kills: int, step: int,
              rng: random.Random, env: dict[str, str], say: Callable[[str], None] = print,
              warmup: bool = False) -> Summary:
    """`kills` random kill -9 rounds of `command(n_trials)`, then a final run to the last target (after an
    unkilled warm-up run with `warmup`)."""
    timing = Timing()
    rounds: list[Round] = []
    if warmup:  # one run without a kill: real timings (the export's above all) and a best/ to be replaced
        w = Worker(command(step), env)
        if w.finish(3600):
            say(w.text()[-3000:])
        learn(w, timing, step)
        say(f"  warm-up run: {step} trials, start-up {timing.startup:.0f}s, trial {timing.trial:.1f}s, "
            f"export {timing.export:.0f}s")
    phases = [PHASES[i % 3] for i in range(kills)]
    rng.shuffle(phases)
    for i, phase in enumerate(phases):
        done, _, finished = study_state(url, study)
        r = Round(i + 1, phase, finished + (step if phase != "start-up" else 1), completed_before=len(done))
        w = kill_round(command(r.target), env, r, rng, timing)
        if rounds:
            rounds[-1].recovered = recovered_by(w)
        after, running, _ = study_state(url, study)
        r.completed_after = len(after)
        r.lost = sum(1 for n, v in done.items() if after.get(n) != v)
        r.running = running
        r.best, r.temps = export_state(run_dir)
        rounds.append(r)
        say(row(r, recovered=False))
    done, _, finished = study_state(url, study)
    target = max(finished, rounds[-1].target if rounds else 1)
    w = Worker(command(target), env)
    code = w.finish(3600)
    if rounds:
        rounds[-1].recovered = recovered_by(w)
    after, running, finished = study_state(url, study)
    lost = sum(r.lost for r in rounds) + sum(1 for n, v in done.items() if after.get(n) != v)
    best, temps = export_state(run_dir)
    loadable, current = check_best(run_dir, url, study) if best == "complete" else (False, False)
    if code:
        say(w.text()[-3000:])
    return Summary(rounds, code, target, finished, lost, running, best, loadable, current, temps)


def recovered_by(w: Worker) -> int:
    m = re.search(r"(\d+) trial\(s\) left RUNNING by a dead worker", w.text())
    return int(m[1]) if m else 0


HEADER = (f"{'#':>3} {'phase':<9} {'n_trials':>8} {'kill at':>8} {'completed':>10} {'lost':>4} "
          f"{'running':>7} {'recovered':>9} {'best/':>8} {'temps':>5}  last line before the kill")


def row(r: Round, recovered: bool = True) -> str:
    kill = f"{r.at:7.1f}s" if r.killed else "  exited"
    rec = f"{r.recovered:>9}" if recovered else " " * 9
    done = f"{r.completed_before:>4} ->{r.completed_after:>4}"
    return (f"{r.run:>3} {r.phase:<9} {r.target:>8} {kill:>8} {done} {r.lost:>4} {r.running:>7} {rec} "
            f"{r.best:>8} {r.temps:>5}  {r.last_line}")


def report(s: Summary, say: Callable[[str], None] = print) -> None:
    say("\n" + HEADER)
    for r in s.rounds:
        say(row(r))
    by_phase = {p: sum(r.killed for r in s.rounds if r.phase == p) for p in PHASES}
    say(f"\nkills landed: {sum(r.killed for r in s.rounds)}/{len(s.rounds)} "
        f"({', '.join(f'{p} {n}' for p, n in by_phase.items())}); partial exports after a kill: "
        f"{sum(r.best == 'PARTIAL' for r in s.rounds)}; temp folders right after a kill: "
        f"{sum(r.temps for r in s.rounds)}; RUNNING left by kills: {sum(r.running for r in s.rounds)}, "
        f"reported recovered by the next start: {sum(r.recovered for r in s.rounds)}")
    say(f"final run: exit {s.exit_code}; finished {s.finished}/{s.target}; completed trials lost {s.lost}; "
        f"stuck RUNNING {s.running}; best/ {s.best}{' loadable' if s.loadable else ''}"
        f"{' current' if s.current else ''}; temp folders left {s.temps}")
    say("PASS" if s.ok else "FAIL")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, default=2, help="n_trials added per round")
    ap.add_argument("--run-root", default=None, help="default: a fresh temporary folder")
    ap.add_argument("--study", default="killbench")
    ap.add_argument("overrides", nargs="*", help="extra `python -m optimizer` overrides")
    args = ap.parse_args(argv)
    run_root = Path(args.run_root or tempfile.mkdtemp(prefix="kill-runs-"))
    run_dir = run_root / args.study
    base = [sys.executable, "-m", "optimizer", f"study_name={args.study}", f"run_root={run_root}",
            "threads=1", "sampler=tpe", "export.heldout_top_k=2", *args.overrides]
    print(f"{args.kills} kill -9 runs of study {args.study!r} under {run_root}\n{HEADER}", flush=True)
    summary = kill_loop(lambda n: [*base, f"n_trials={n}"], f"sqlite:///{run_dir / 'study.db'}", args.study,
                        run_dir, args.kills, args.step, random.Random(args.seed),
                        {**os.environ, "PYTHONUNBUFFERED": "1"}, say=lambda line: print(line, flush=True),
                        warmup=True)
    report(summary)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The zoo build reports progress without a terminal: plain lines per stage, at most one per interval."""

import io
from types import SimpleNamespace

from rich.console import Console

from optimizer.zoo.progress import BuildProgress


def run_stages(console, clock):
    with BuildProgress(SimpleNamespace(seed=7), enabled=True, console=console, interval=10.0, clock=clock) as bar:
        advance = bar.stage("pretrain base", 100)
        for step in range(100):
            clock.t += 0.5  # 50 s for the stage
            advance(step, loss=3.0 - step / 100)
        evaluate = bar.stage("evaluate (lm-eval)", 3)
        for step in range(3):
            evaluate(step)


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_without_a_terminal_stages_print_periodic_lines():
    out = io.StringIO()
    run_stages(Console(file=out, force_terminal=False, width=120), Clock())
    lines = out.getvalue().splitlines()
    assert lines[0] == "building demo zoo (seed 7): progress every 10 s"
    base = [ln for ln in lines if ln.startswith("pretrain base")]
    assert base[0].split()[2] == "1/100" and base[-1].split()[2] == "100/100"
    assert 5 <= len(base) <= 7  # first step, about every 10 s of 50, last step
    assert "loss 2.010" in base[-1] and base[-1].endswith("(50 s)")
    assert [ln.split()[2] for ln in lines if ln.startswith("evaluate")] == ["1/3", "3/3"]
    assert lines[-1] == "demo zoo built in 50 s"


def test_on_a_terminal_rich_draws_bars_not_lines():
    out = io.StringIO()
    run_stages(Console(file=out, force_terminal=True, width=120), Clock())
    assert "progress every" not in out.getvalue() and "━" in out.getvalue()  # bars, drawn live


def test_disabled_prints_nothing():
    out = io.StringIO()
    with BuildProgress(SimpleNamespace(seed=1), enabled=False, console=Console(file=out)) as bar:
        bar.stage("x", 2)(0)
    assert out.getvalue() == ""

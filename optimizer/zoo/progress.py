"""Progress of the zoo build: rich bars on a terminal, periodic plain lines otherwise (logs, CI, pipes).

A rich live display draws nothing until it stops when the output is not a terminal, which made a
three-minute build look hung; without a terminal each stage prints a line when it starts, every
`interval` seconds while it runs, and when it ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console


class BuildProgress:
    """Context manager handing out per-stage step callbacks.

    Args:
        recipe: the recipe being built (shown in the title).
        enabled: False gives no-op callbacks (library use, tests).
        console: where to draw (default: a Console on stdout); its `is_terminal` picks bars or lines.
        interval: seconds between plain progress lines of one stage.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, recipe, *, enabled: bool, console: Console | None = None, interval: float = 15.0,
                 clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.console = console
        self.interval = interval
        self.clock = clock
        self._progress = None
        self._plain = False
        self._start = 0.0
        self._title = f"building demo zoo (seed {recipe.seed})"

    def __enter__(self) -> BuildProgress:
        if not self.enabled:
            return self
        console = self.console or Console()
        self._start = self.clock()
        if not console.is_terminal:
            self.console, self._plain = console, True
            self._line(f"{self._title}: progress every {self.interval:.0f} s")
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
        )
        self._progress.console.print(f"[bold]{self._title}")
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._plain and exc[0] is None:
            self._line(f"demo zoo built in {self.clock() - self._start:.0f} s")

    def _line(self, text: str) -> None:
        assert self.console is not None
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        self.console.file.flush()

    def stage(self, name: str, total: int) -> Callable[..., None]:
        """A callback `(step, loss=None)` that advances a new bar (or line series) of `total` steps."""
        if self._plain:
            return self._plain_stage(name, total)
        if self._progress is None:
            return lambda *args, **kwargs: None
        task = self._progress.add_task(name, total=total, info="")
        progress = self._progress

        def advance(step: int, loss: float | None = None) -> None:
            info = f"loss {loss:.3f}" if loss is not None else ""
            progress.update(task, completed=step + 1, info=info)

        return advance

    def _plain_stage(self, name: str, total: int) -> Callable[..., None]:
        last = [None]  # time of the last line of this stage; None: nothing printed yet

        def advance(step: int, loss: float | None = None) -> None:
            now, done = self.clock(), step + 1
            if last[0] is not None and now - last[0] < self.interval and done < total:
                return
            last[0] = now
            info = f"  loss {loss:.3f}" if loss is not None else ""
            self._line(f"{name:<22} {done:>5}/{total}{info}  ({now - self._start:.0f} s)")

        return advance

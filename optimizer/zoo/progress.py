"""A rich progress display for the zoo build (one bar per stage; silent when disabled)."""

from __future__ import annotations

from collections.abc import Callable


class BuildProgress:
    """Context manager handing out per-stage step callbacks.

    Args:
        recipe: the recipe being built (shown in the title).
        enabled: False gives no-op callbacks (library use, tests).
    """

    def __init__(self, recipe, *, enabled: bool):
        self.enabled = enabled
        self._progress = None
        self._title = f"building demo zoo (seed {recipe.seed})"

    def __enter__(self) -> BuildProgress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            )
            self._progress.console.print(f"[bold]{self._title}")
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def stage(self, name: str, total: int) -> Callable[..., None]:
        """A callback `(step, loss=None)` that advances a new bar of `total` steps named `name`."""
        if self._progress is None:
            return lambda *args, **kwargs: None
        task = self._progress.add_task(name, total=total, info="")
        progress = self._progress

        def advance(step: int, loss: float | None = None) -> None:
            info = f"loss {loss:.3f}" if loss is not None else ""
            progress.update(task, completed=step + 1, info=info)

        return advance

"""Loading lm-eval tasks: one TaskManager per run, split overrides, the test-split guard, quiet task builds."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from optimizer import UserError

# lm-eval 0.4.13 logs this hint (two lines, at WARNING) each time it builds a task whose data comes from a
# Python function (`custom_dataset: !function ...`, as the zoo tasks do): "<task>: Custom kwargs can be passed
# to `--metadata` in console ... or to the TaskManager." It tells a command-line user how to hand keyword
# arguments to that function; it is logged whether or not any are passed, so a run that builds 3 tasks for 2
# splits printed it six times. Callers here pass the function's arguments through `TaskManager(metadata=...)`
# already, so the hint has nothing to say; `quiet_task_builds` drops exactly that record (a logging filter
# on lm-eval's task logger, lm-eval itself untouched) and lets every other lm-eval warning through.
_CUSTOM_DATASET_HINT = "Custom kwargs can be passed to `--metadata`"
_TASK_LOGGER = "lm_eval.api.task"


class _DropCustomDatasetHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _CUSTOM_DATASET_HINT not in record.getMessage()


@contextlib.contextmanager
def quiet_task_builds() -> Iterator[None]:
    """Within the block, lm-eval logs warnings and errors only (its INFO lines narrate every task and request
    build) and not the custom-dataset hint (see above)."""
    logger, root = logging.getLogger(_TASK_LOGGER), logging.getLogger("lm_eval")
    f = _DropCustomDatasetHint()
    level = root.level
    logger.addFilter(f)
    if root.getEffectiveLevel() < logging.WARNING:
        root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.removeFilter(f)
        root.setLevel(level)


def task_manager(include_path: Sequence[str | Path], names: Sequence[str] = (),
                 metadata: dict[str, Any] | None = None) -> Any:
    """An lm-eval TaskManager that knows `names`.

    Indexing lm-eval's ~14k bundled task YAMLs costs ~10 s; when every name is found under `include_path`
    alone (the demo zoo), the bundled ones are not indexed.

    Args:
        include_path: folders of task YAMLs (checked to exist).
        names: the task names the caller will load.
        metadata: passed to every task (`custom_dataset` functions receive it as keyword arguments).
    """
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path]
    for p in paths:
        if not Path(p).is_dir():
            raise UserError(f"evaluator.include_path entry {p!r} is not a folder of lm-eval task YAMLs.")
    if paths and names:
        local = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
        if set(names) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=paths or None, metadata=metadata)


def load_tasks(manager: Any, specs: Sequence[str | dict[str, Any]], what: str) -> dict[str, Any]:
    """`manager.load(specs)["tasks"]` (name -> lm-eval Task), errors turned into one UserError paragraph."""
    try:
        with quiet_task_builds():
            return dict(manager.load(list(specs))["tasks"])
    except Exception as e:
        raise UserError(f"evaluator: lm-eval could not load the tasks for {what} ({type(e).__name__}: {e}). "
                        "If offline, the datasets must be in the local cache (HF_DATASETS_OFFLINE=1).") from None


def with_overrides(manager: Any, name: str, overrides: dict[str, Any]) -> str | dict[str, Any]:
    """A task spec with some config keys replaced (e.g. test_split).

    lm-eval treats an inline dict as a whole new task, so the registered YAML is read and the overrides are
    laid over it; the task keeps its registered name, so results are keyed as usual.
    """
    if not overrides:
        return name
    entry = manager.task_index.get(name)
    if entry is None or not getattr(entry, "yaml_path", None):
        raise UserError(f"evaluator.tasks: {name!r} is a group or Python task; list its subtasks to set "
                        f"{sorted(overrides)} per task.")
    from lm_eval.tasks._yaml_loader import load_yaml

    return {**load_yaml(entry.yaml_path, resolve_func=True), **overrides, "task": name}


_HELD_BACK_SPLITS = ("test", "validation", "valid", "val", "dev", "eval")


def check_search_split(manager: Any, name: str, search_split: str | None) -> None:
    """Refuse to search on the split a task reports its official scores on (its test or validation split).

    Searching there turns a public benchmark into training data; set evaluator.allow_test_split=true to
    do it anyway. The check is by the split's name, as registered or as configured.
    """
    split = search_split
    if split is None:
        entry = manager.task_index.get(name)
        if entry is not None and getattr(entry, "yaml_path", None):
            from lm_eval.tasks._yaml_loader import load_yaml

            cfg = load_yaml(entry.yaml_path, resolve_func=False)
            split = cfg.get("test_split") or cfg.get("validation_split")
    if split is not None and str(split).lower() in _HELD_BACK_SPLITS:
        raise UserError(f"evaluator.tasks: {name!r} would be searched on its {split!r} split, which is "
                        "where its scores are reported; searching there overfits the benchmark. Set "
                        f"search_split to another split (e.g. train) and heldout_split={split!r}, or set "
                        "evaluator.allow_test_split=true to do it anyway.")

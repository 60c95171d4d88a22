"""lm-eval evaluator: one HFLM around the live model, task dicts built once per split, reused every trial."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from optimizer import UserError
from optimizer.eval import register_evaluator
from optimizer.eval.base import HELDOUT, SEARCH, Scores
from optimizer.resources import resolve_path


@dataclass
class TaskSpec:
    """One lm-eval task in the objective.

    Args:
        name: a task name in lm-eval's registry or under an include path.
        weight: its weight in the objective (weighted mean over tasks).
        metric: the metric that scores it (default: the task's first metric, e.g. acc).
        search_split / heldout_split: the dataset split used for each purpose (None: the task's test split
            for search; no held-out score).
        num_fewshot, limit: as in lm-eval (limit: an item count, or a fraction when < 1).
    """

    name: str = "???"
    weight: float = 1.0
    metric: str | None = None
    search_split: str | None = None
    heldout_split: str | None = None
    num_fewshot: int | None = None
    limit: float | None = None


@dataclass
class LmEvalConfig:
    name: str = "lm_eval"
    tasks: list[TaskSpec] = field(default_factory=list)
    include_path: list[str] = field(default_factory=list)
    batch_size: int = 64
    max_length: int = 512
    apply_chat_template: bool = False
    limit: float | None = None
    chunk_size: int = 0  # >0: score items in chunks and report each item (per-item pruning)
    shuffle: bool = False  # item order (and the subset a `limit` takes) drawn from the study seed
    allow_test_split: bool = False


def parse_config(node: Any) -> LmEvalConfig:
    """Typed view of the `evaluator` node; a plain string in `tasks` is a task name."""
    raw = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    raw["tasks"] = [{"name": t} if isinstance(t, str) else t for t in raw.get("tasks", [])]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(LmEvalConfig), raw)
    except Exception as e:
        raise UserError(f"evaluator config is invalid: {e}".replace("\n", " ")) from None
    cfg: LmEvalConfig = OmegaConf.to_object(merged)
    if not cfg.tasks:
        raise UserError("evaluator.tasks is empty: list at least one lm-eval task name.")
    return cfg


class LmEvalEvaluator:
    """Scores the live model with lm-eval; the trial value is the weighted mean of the task metrics."""

    name = "lm_eval"

    def __init__(self, cfg: LmEvalConfig, context: dict[str, Any]):
        self.cfg = cfg
        self.context = context
        self._lm = None
        self._lm_model = None
        self._task_dicts: dict[str, Any] = {}
        self._manager = None

    @property
    def weights(self) -> dict[str, float]:
        return {t.name: t.weight for t in self.cfg.tasks}

    @property
    def chunk_size(self) -> int:
        return self.cfg.chunk_size

    def splits(self) -> tuple[str, ...]:
        return (SEARCH, HELDOUT) if all(t.heldout_split for t in self.cfg.tasks) else (SEARCH,)

    def close(self) -> None:
        """Nothing to release: the wrapped model belongs to the run."""

    def _task_manager(self) -> Any:
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            paths = [str(resolve_path(p)) for p in self.cfg.include_path]
            for p in paths:
                if not Path(p).is_dir():
                    raise UserError(f"evaluator.include_path entry {p!r} is not a folder of lm-eval task YAMLs.")
            self._manager = TaskManager(include_path=paths or None)
        return self._manager

    def validate(self) -> None:
        """Every task name must resolve in lm-eval's registry (or the include paths) before any trial."""
        manager = self._task_manager()
        known = set(manager.all_tasks)
        for t in self.cfg.tasks:
            if t.name not in known:
                close = sorted(k for k in known if t.name.split("_")[0] in k)[:8]
                raise UserError(f"evaluator.tasks: {t.name!r} is not an lm-eval task (installed registry "
                                f"plus include_path {self.cfg.include_path}). Similar names: {close or 'none'}.")
        if not self.cfg.allow_test_split:
            for t in self.cfg.tasks:
                check_search_split(manager, t)
        for split in self.splits():
            self._tasks_for(split)

    def _tasks_for(self, split: str) -> Any:
        if split not in self._task_dicts:
            specs = []
            for t in self.cfg.tasks:
                spec: dict[str, Any] = {}
                chosen = t.search_split if split == SEARCH else t.heldout_split
                if split == HELDOUT and not chosen:
                    raise UserError(f"evaluator.tasks: {t.name!r} has no heldout_split; set one to get "
                                    "held-out scores.")
                if chosen:
                    spec["test_split"] = chosen
                if t.num_fewshot is not None:
                    spec["num_fewshot"] = t.num_fewshot
                specs.append(_with_overrides(self._task_manager(), t.name, spec))
            try:
                self._task_dicts[split] = self._task_manager().load(specs)
            except Exception as e:
                raise UserError(f"evaluator: lm-eval could not load the tasks for split {split!r} "
                                f"({type(e).__name__}: {e}). If offline, the datasets must be in the local "
                                "cache (HF_DATASETS_OFFLINE=1).") from None
        return self._task_dicts[split]

    def _wrap(self, model: Any, tokenizer: Any) -> Any:
        # One HFLM for the whole study: in-place weight changes are seen by it, no re-wrapping needed.
        if self._lm is None or self._lm_model is not model:
            from lm_eval.models.huggingface import HFLM

            logging.getLogger("lm_eval").setLevel(logging.ERROR)
            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.cfg.batch_size,
                            max_length=self.cfg.max_length)
            self._lm_model = model
        return self._lm

    def item_indices(self, split: str) -> dict[str, list[int]]:
        """The items scored per task, in a fixed order (per-task `limit`, else the global one)."""
        tasks = self._tasks_for(split)["tasks"]
        out = {}
        for t in self.cfg.tasks:
            total = len(tasks[t.name].eval_docs)
            order = list(range(total))
            if self.cfg.shuffle:  # one fixed order per study seed: early chunks are a fair sample
                random.Random(f"{self.context.get('seed', 0)}/{t.name}/{split}").shuffle(order)
            lim = t.limit if t.limit is not None else self.cfg.limit
            if lim is not None:
                order = order[:int(lim) if lim >= 1 else max(1, math.ceil(lim * total))]
            out[t.name] = order
        return out

    def evaluate(self, model: Any, tokenizer: Any, split: str, *, on_item: Callable | None = None) -> Scores:
        lm = self._wrap(model, tokenizer)
        t0 = time.perf_counter()
        indices = self.item_indices(split)
        chunk = self.cfg.chunk_size if on_item is not None and self.cfg.chunk_size > 0 else 0
        if not chunk:
            out = self._run(lm, split, indices)
            scores = Scores(tasks={}, info={})
            for t in self.cfg.tasks:
                res = out["results"][t.name]
                key = _metric_key(res, t.metric, t.name)
                scores.tasks[t.name] = float(res[key])
                for k, v in res.items():
                    if isinstance(v, (int, float)) and "," in k and "stderr" not in k:
                        scores.metrics[f"{t.name}/{k.split(',')[0]}"] = float(v)
                scores.items[t.name] = _item_values(out["samples"][t.name], key.split(",")[0], indices[t.name])
        else:
            scores = self._chunked(lm, split, indices, chunk, on_item)
        scores.info["eval_seconds"] = time.perf_counter() - t0
        return scores

    def _run(self, lm: Any, split: str, indices: dict[str, list[int]]) -> dict[str, Any]:
        from lm_eval.evaluator import evaluate

        # lm-eval draws several tqdm bars per call (it passes disable=False, so TQDM_DISABLE has no effect):
        # thousands of lines over a study. They go to a buffer, shown only if the evaluation fails.
        quiet = os.environ.get("TQDM_DISABLE", "1") != "0"
        buf = io.StringIO()
        try:
            with contextlib.redirect_stderr(buf) if quiet else contextlib.nullcontext():
                return evaluate(lm, self._tasks_for(split), samples=indices, bootstrap_iters=0, log_samples=True,
                                apply_chat_template=self.cfg.apply_chat_template, verbosity="ERROR")
        except BaseException:
            sys.stderr.write(buf.getvalue()[-5000:])
            raise

    def _chunked(self, lm: Any, split: str, indices: dict[str, list[int]], chunk: int,
                 on_item: Callable) -> Scores:
        """Score `chunk` items of every task at a time and report each, so a pruner can stop early.

        Task scores are the mean of the per-item metric (exact for mean-aggregated metrics such as acc).
        """
        items: dict[str, list[float]] = {t.name: [] for t in self.cfg.tasks}
        longest = max(len(v) for v in indices.values())
        for start in range(0, longest, chunk):
            part = {k: v[start:start + chunk] for k, v in indices.items() if v[start:start + chunk]}
            out = self._run(lm, split, part)
            for t in self.cfg.tasks:
                if t.name not in part:
                    continue
                metric = _metric_key(out["results"][t.name], t.metric, t.name).split(",")[0]
                for v in _item_values(out["samples"][t.name], metric, part[t.name]):
                    on_item(t.name, len(items[t.name]), v)
                    items[t.name].append(v)
        tasks = {k: sum(v) / len(v) for k, v in items.items()}
        return Scores(tasks=tasks, metrics={f"{k}/mean": v for k, v in tasks.items()}, items=items, info={})


_HELD_BACK_SPLITS = ("test", "validation", "valid", "val", "dev", "eval")


def check_search_split(manager: Any, spec: TaskSpec) -> None:
    """Refuse to search on the split a task reports its official scores on (its test or validation split).

    Searching there turns a public benchmark into training data; set evaluator.allow_test_split=true to
    do it anyway. The check is by the split's name, as registered or as configured.
    """
    split = spec.search_split
    if split is None:
        entry = manager.task_index.get(spec.name)
        if entry is not None and getattr(entry, "yaml_path", None):
            from lm_eval.tasks._yaml_loader import load_yaml

            cfg = load_yaml(entry.yaml_path, resolve_func=False)
            split = cfg.get("test_split") or cfg.get("validation_split")
    if split is not None and str(split).lower() in _HELD_BACK_SPLITS:
        raise UserError(f"evaluator.tasks: {spec.name!r} would be searched on its {split!r} split, which is "
                        "where its scores are reported; searching there overfits the benchmark. Set "
                        f"search_split to another split (e.g. train) and heldout_split={split!r}, or set "
                        "evaluator.allow_test_split=true to do it anyway.")


def _item_values(samples: list[dict[str, Any]], metric: str, order: list[int]) -> list[float]:
    """Per-item metric values in the order the items were asked for (lm-eval returns them by doc id)."""
    by_id = {s.get("doc_id"): s.get(metric) for s in samples}
    return [float(by_id[i]) for i in order if isinstance(by_id.get(i), (int, float, bool))]


def _with_overrides(manager: Any, name: str, overrides: dict[str, Any]) -> str | dict[str, Any]:
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


def _metric_key(result: dict[str, Any], metric: str | None, task: str) -> str:
    keys = [k for k in result if "," in k and "stderr" not in k and isinstance(result[k], (int, float))]
    if metric is None:
        if not keys:
            raise UserError(f"lm-eval task {task!r} reported no numeric metric.")
        return keys[0]
    for k in keys:
        if k.split(",")[0] == metric or k == metric:
            return k
    raise UserError(f"evaluator.tasks: metric {metric!r} is not reported by task {task!r}; it reports "
                    f"{sorted({k.split(',')[0] for k in keys})}.")


@register_evaluator("lm_eval")
def build(node: Any, context: dict[str, Any]) -> LmEvalEvaluator:
    return LmEvalEvaluator(parse_config(node), context)

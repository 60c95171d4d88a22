"""lm-eval evaluator: one HFLM around the live model; each split's requests built once (engine.py), scored
every trial, optionally in chunks with per-item reports for a pruner."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from optimizer import UserError
from optimizer.eval import register_evaluator
from optimizer.eval import search_metric as sm
from optimizer.eval.base import HELDOUT, SEARCH, Scores
from optimizer.eval.engine import Engine, PreparedTask, TaskRun, prepare_task, score
from optimizer.eval.tasks import (
    check_search_split,
    load_tasks,
    quiet_task_builds,
    task_manager,
    with_overrides,
)
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
        search_metric: a continuous per-item value (`margin`, `prob`; see eval/search_metric.py) used as
            this task's trial value on the search split instead of `metric`; None: the evaluator-wide
            `search_metric`. The held-out split always reports `metric`.
        dataset_path / dataset_kwargs: where the task's data comes from instead of its registered
            `dataset_path` (a hub id, or a local folder in the hub dataset's layout, e.g. a JGLUE copy:
            optimizer/zoo/jglue.py) and extra `datasets.load_dataset` arguments; prompts, few-shot and
            metric stay the task's own.
    """

    name: str = "???"
    weight: float = 1.0
    metric: str | None = None
    search_split: str | None = None
    heldout_split: str | None = None
    num_fewshot: int | None = None
    limit: float | None = None
    search_metric: str | None = None
    dataset_path: str | None = None
    dataset_kwargs: dict[str, Any] | None = None


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
    search_metric: str | None = None  # every task's default search metric (off: the task's metric)
    share_context: bool = True  # loglikelihood requests with one context: its forward pass once (see shared_context)


def dataset_location(t: TaskSpec) -> str:
    """`dataset_path` as lm-eval gets it: a local folder made absolute (UserError if it is missing)."""
    path = os.path.expanduser(str(t.dataset_path))
    if path.startswith((".", "/", "~")) or os.path.isdir(path):
        if not os.path.isdir(path):
            raise UserError(f"evaluator.tasks: {t.name!r} has dataset_path={t.dataset_path!r}, which is not a "
                            "folder; point it at a local copy of the dataset (see optimizer/zoo/jglue.py).")
        return os.path.abspath(path)
    return path


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
    """Scores the live model with lm-eval; the trial value is the weighted mean of the task metrics.

    Requests are built once per split (in `validate`, or at the first evaluation when a chat template
    needs the LM) and only re-scored per trial; see optimizer/eval/engine.py.
    """

    name = "lm_eval"

    def __init__(self, cfg: LmEvalConfig, context: dict[str, Any]):
        self.cfg = cfg
        self.context = context
        self._manager = None
        self._tasks: dict[str, dict[str, Any]] = {}
        self._prepared: dict[str, list[PreparedTask]] = {}
        self._engine: Engine | None = None
        self._engine_model = None

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

    def search_metric(self, spec: TaskSpec) -> str | None:
        """The search metric of a task (its own, else the evaluator-wide one; None = its metric)."""
        return spec.search_metric or self.cfg.search_metric

    def _task_manager(self) -> Any:
        if self._manager is None:
            paths = [str(resolve_path(p)) for p in self.cfg.include_path]
            self._manager = task_manager(paths, [t.name for t in self.cfg.tasks])
        return self._manager

    def validate(self) -> None:
        """Every task name must resolve in lm-eval's registry (or the include paths) before any trial; the
        tasks are loaded and their requests built here, so the first trial costs what every trial costs."""
        manager = self._task_manager()
        known = set(manager.all_tasks)
        for t in self.cfg.tasks:
            if t.name not in known:
                close = sorted(k for k in known if t.name.split("_")[0] in k)[:8]
                raise UserError(f"evaluator.tasks: {t.name!r} is not an lm-eval task (installed registry "
                                f"plus include_path {self.cfg.include_path}). Similar names: {close or 'none'}.")
        if not self.cfg.allow_test_split:
            for t in self.cfg.tasks:
                check_search_split(manager, t.name, t.search_split)
        for split in self.splits():
            tasks = self.tasks_for(split)
            if split == SEARCH:
                for i, t in enumerate(self.cfg.tasks):
                    if self.search_metric(t):
                        where = f"evaluator.tasks[{i}].search_metric" if t.search_metric else "evaluator.search_metric"
                        sm.check(self.search_metric(t), t.name, str(tasks[t.name].OUTPUT_TYPE), where)
            if not self.cfg.apply_chat_template:  # a chat template needs the LM: built at the first evaluation
                self._prepared_for(split, None)

    def tasks_for(self, split: str) -> dict[str, Any]:
        """Task name -> the loaded lm-eval Task of `split` (loaded once)."""
        if split not in self._tasks:
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
                if t.dataset_path is not None:
                    spec["dataset_path"] = dataset_location(t)
                if t.dataset_kwargs is not None:
                    spec["dataset_kwargs"] = dict(t.dataset_kwargs)
                specs.append(with_overrides(self._task_manager(), t.name, spec))
            self._tasks[split] = load_tasks(self._task_manager(), specs, f"split {split!r}")
        return self._tasks[split]

    def item_indices(self, split: str) -> dict[str, list[int]]:
        """The items scored per task, in a fixed order (per-task `limit`, else the global one)."""
        tasks = self.tasks_for(split)
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

    def _prepared_for(self, split: str, lm: Any) -> list[PreparedTask]:
        if split not in self._prepared:
            tasks, indices = self.tasks_for(split), self.item_indices(split)
            with _quiet(), quiet_task_builds():
                self._prepared[split] = [
                    prepare_task(t.name, tasks[t.name], indices[t.name], lm=lm,
                                 apply_chat_template=self.cfg.apply_chat_template)
                    for t in self.cfg.tasks]
        return self._prepared[split]

    def _engine_for(self, model: Any, tokenizer: Any) -> Engine:
        # One HFLM per live model: in-place weight changes are seen by it, no re-wrapping needed.
        if self._engine is None or self._engine_model is not model:
            from lm_eval.models.huggingface import HFLM

            logging.getLogger("lm_eval").setLevel(logging.ERROR)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.cfg.batch_size,
                      max_length=self.cfg.max_length)
            self._engine, self._engine_model = Engine(lm, share_context=self.cfg.share_context), model
        return self._engine

    def evaluate(self, model: Any, tokenizer: Any, split: str, *, on_item: Callable | None = None) -> Scores:
        t0 = time.perf_counter()
        engine = self._engine_for(model, tokenizer)
        prepared = self._prepared_for(split, engine.lm)
        chunk = self.cfg.chunk_size if on_item is not None and self.cfg.chunk_size > 0 else None
        reported = {p.name: 0 for p in prepared}
        specs = {t.name: t for t in self.cfg.tasks}

        def report(run: TaskRun) -> None:  # per-item values as each chunk is scored; on_item may prune
            for v in self._trial_items(specs[run.prepared.name], split, run):
                on_item(run.prepared.name, reported[run.prepared.name], v)
                reported[run.prepared.name] += 1

        runs = score(engine, prepared, chunk, report if chunk else None)  # draws no progress bars
        scores = self._scores(split, runs)
        scores.info["eval_seconds"] = time.perf_counter() - t0
        return scores

    def _trial_items(self, spec: TaskSpec, split: str, run: TaskRun) -> list[float]:
        """Per-item values of what the trial is scored on: the search metric, else the task's metric."""
        metric = self.search_metric(spec) if split == SEARCH else None
        if metric:
            return [sm.item_value(metric, run.prepared, it) for it in run.items]
        return run.values(_metric_key(dict.fromkeys(run.keys(), 0.0), spec.metric, spec.name))

    def _scores(self, split: str, runs: dict[str, TaskRun]) -> Scores:
        scores = Scores(tasks={}, info={})
        replaced: dict[str, float] = {}
        for t in self.cfg.tasks:
            run = runs[t.name]
            agg = run.aggregate()
            key = _metric_key(agg, t.metric, t.name)
            for k, v in agg.items():
                if isinstance(v, (int, float)):
                    scores.metrics[f"{t.name}/{k.split(',')[0]}"] = float(v)
            scores.items[t.name] = run.values(key)
            scores.items[f"{t.name}/{key.split(',')[0]}"] = scores.items[t.name]
            scores.tasks[t.name] = float(agg[key])
            for name, values in _continuous(run).items():
                scores.items[f"{t.name}/{name}"] = values
                scores.metrics[f"{t.name}/{name}"] = sum(values) / len(values)
            metric = self.search_metric(t) if split == SEARCH else None
            if metric:
                replaced[t.name] = scores.tasks[t.name]
                scores.tasks[t.name] = scores.metrics[f"{t.name}/{metric}"]
                scores.items[t.name] = scores.items[f"{t.name}/{metric}"]
        if replaced:  # the trial value is the search metric; what the task reports is kept beside it
            scores.info["reported_scores"] = replaced
            scores.info["search_metric"] = {t.name: self.search_metric(t) for t in self.cfg.tasks
                                            if self.search_metric(t)}
        return scores


def _continuous(run: TaskRun) -> dict[str, list[float]]:
    """Every search metric's per-item values, for tasks they apply to (empty otherwise)."""
    p = run.prepared
    if p.output_type not in sm.OUTPUT_TYPES or not run.items:
        return {}
    if p.output_type == "loglikelihood" and run.items[0].tokens[0] is None:
        return {}
    return {name: [sm.item_value(name, p, it) for it in run.items] for name in sm.SEARCH_METRICS}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval draws a tqdm bar per task while building requests (it passes no `disable`): it goes to a
    buffer, shown only if the build fails. TQDM_DISABLE=0 shows it."""
    if os.environ.get("TQDM_DISABLE", "1") == "0":
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    except BaseException:
        sys.stderr.write(buf.getvalue()[-5000:])
        raise


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

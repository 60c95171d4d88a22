"""Score a live model on lm-eval tasks whose requests are built once: the one definition of "evaluate".

`lm_eval.evaluator.evaluate` rebuilds every request on each call (templates, few-shot contexts) and the LM
re-tokenises them; a study scores the same items every trial, so here that work is done once:

    prepare_task(name, task, order)   task.build_all_requests(...) for the items in `order`, once
    Engine(lm).run([(prepared, positions), ...])
        per request type, the LM's own scoring on exactly the instances of those items (loglikelihood
        requests tokenised once, then `lm._loglikelihood_tokens`, the method `lm.loglikelihood` ends in, or
        for requests sharing a context `shared_context.SharedContextScorer`, one context pass for all of them;
        `lm.generate_until` / `lm.loglikelihood_rolling` as they are), then each task's filters,
        `task.process_results` per item and, in `TaskRun.aggregate`, the task's aggregation functions

so a call costs in proportion to the items it scores (on the demo zoo, chunks of 30 items cost ~1.3x a single
pass per item, from their partly filled last batches; before, each chunk rebuilt its requests), and the
results equal `evaluate`'s item by item (tests/eval/test_engine.py checks it on the zoo tasks).
lm-eval is wrapped, never patched: only its public Task/Instance/LM interfaces are called, plus a task's
filter list (`task._filters`, which `task.apply_filters()` runs over all instances, here over the scored ones).

One difference on purpose: `evaluate(samples=...)` scores the chosen docs in dataset order but labels them by
position in the list it was given, so an unsorted (shuffled) list mislabels the per-item results. Here every
item keeps its doc id, and per-item values come back in the order asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


@dataclass
class Item:
    """One scored document: its index in `task.eval_docs` and its requests (sorted by choice index)."""

    doc_id: int
    doc: Any
    instances: list[Any]


@dataclass
class PreparedTask:
    """An lm-eval task with the requests of a fixed, ordered list of items built once."""

    name: str
    task: Any
    items: list[Item]
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)  # per-doc facts fixed for the study

    def __len__(self) -> int:
        return len(self.items)

    @property
    def output_type(self) -> str:
        return str(self.task.OUTPUT_TYPE)

    @property
    def doc_ids(self) -> list[int]:
        return [it.doc_id for it in self.items]


def prepare_task(name: str, task: Any, order: Sequence[int], *, lm: Any = None, apply_chat_template: bool = False,
                 system_instruction: str | None = None, fewshot_as_multiturn: bool = False) -> PreparedTask:
    """Build the requests of the items `order` (indices into `task.eval_docs`) once, as `evaluate` does.

    Args:
        name: the task's name (results are keyed by it).
        task: an lm-eval Task (from `TaskManager.load`); its `instances` are replaced.
        order: doc indices in scoring order (distinct).
        lm: the LM, needed only with `apply_chat_template` (its template and tokenizer name).
        apply_chat_template, system_instruction, fewshot_as_multiturn: as in lm-eval's `evaluate`.
    """
    order = [int(i) for i in order]
    if len(set(order)) != len(order):
        raise ValueError(f"task {name!r}: the item order repeats a document")
    total = len(task.eval_docs)
    ids = sorted(order)
    if ids and (ids[0] < 0 or ids[-1] >= total):
        raise ValueError(f"task {name!r} has {total} documents; item {ids[-1]} is out of range")
    every = ids == list(range(total))  # all docs: no `samples` list (lm-eval's membership test is O(n*k))
    task.build_all_requests(
        samples=None if every else ids, rank=0, world_size=1, cache_requests=False,
        system_instruction=system_instruction, apply_chat_template=bool(apply_chat_template),
        fewshot_as_multiturn=fewshot_as_multiturn,
        chat_template=getattr(lm, "apply_chat_template", None) if apply_chat_template else None,
        tokenizer_name=getattr(lm, "tokenizer_name", "") if apply_chat_template else "",
    )
    grouped: dict[int, list[Any]] = {}
    for inst in task.instances:  # inst.doc_id = position among the built docs (dataset order)
        grouped.setdefault(ids[inst.doc_id], []).append(inst)
    items = {d: Item(d, insts[0].doc, sorted(insts, key=lambda x: x.idx)) for d, insts in grouped.items()}
    return PreparedTask(name, task, [items[d] for d in order])


@dataclass
class ItemResult:
    """What one item scored: lm-eval's metrics per (metric, filter), the raw responses and continuation token
    counts of its requests (loglikelihood requests; None otherwise)."""

    doc_id: int
    doc: Any
    metrics: dict[tuple[str, str], Any]
    responses: list[list[Any]]
    tokens: list[int | None]


@dataclass
class TaskRun:
    """The items of one task scored by one or more `Engine.run` calls, in the order they were scored."""

    prepared: PreparedTask
    items: list[ItemResult] = field(default_factory=list)

    def keys(self) -> list[str]:
        """Metric keys as lm-eval reports them ("acc,none"), in its order (filter by filter)."""
        seen: dict[tuple[str, str], None] = {}
        for it in self.items:
            seen.update(dict.fromkeys(it.metrics))
        return [f"{m},{f}" for m, f in sorted(seen, key=lambda k: _filter_rank(self.prepared, k))]

    def values(self, key: str) -> list[float]:
        """Per-item numeric values of `key` ("acc,none"), items without one left out."""
        m, f = key.split(",", 1)
        out = []
        for it in self.items:
            v = it.metrics.get((m, f))
            if isinstance(v, (int, float, bool)):
                out.append(float(v))
        return out

    def aggregate(self) -> dict[str, Any]:
        """`metric,filter` -> the task's aggregation of the per-item values (lm-eval's numbers, no stderr)."""
        from lm_eval.api.metrics import mean

        raw: dict[tuple[str, str], list[Any]] = {}
        for it in self.items:
            for k, v in it.metrics.items():
                raw.setdefault(k, []).append(v)
        aggregation = self.prepared.task.aggregation()
        out = {}
        for key in self.keys():
            m, f = key.split(",", 1)
            out[key] = aggregation.get(m, mean)(raw[(m, f)])
        return out


def _filter_rank(prepared: PreparedTask, key: tuple[str, str]) -> int:
    names = [f.name for f in getattr(prepared.task, "_filters", [])]
    return names.index(key[1]) if key[1] in names else len(names)


class Engine:
    """Runs prepared requests through one lm-eval LM (an HFLM around the live model).

    The LM sees the model's weights as they are at call time, so in-place merges need no re-wrapping.
    Tokenisations of loglikelihood requests are computed on first use and kept.
    """

    def __init__(self, lm: Any, share_context: bool = True):
        from optimizer.eval.shared_context import SharedContextScorer

        self.lm = lm
        self._encoded: dict[int, tuple[Any, tuple]] = {}  # id(instance) -> (instance, lm-eval token request)
        self._pretokenize = _can_pretokenize(lm)
        self._shared = SharedContextScorer(lm) if share_context and SharedContextScorer.supports(lm) else None

    def run(self, parts: Sequence[tuple[PreparedTask, Sequence[int]]]) -> list[TaskRun]:
        """Score the items at `positions` of each prepared task, all request types batched across tasks as
        `evaluate` batches them; returns one TaskRun per part."""
        by_type: dict[str, list[Any]] = {}
        for prepared, positions in parts:
            for p in positions:
                for inst in prepared.items[p].instances:
                    inst.resps = []
                    inst.filtered_resps = {}
                    by_type.setdefault(inst.request_type, []).append(inst)
        for rtype, reqs in by_type.items():
            cloned = [r for r in reqs for _ in range(r.repeats or 1)]
            resps = self._call(rtype, cloned)
            for x, r in zip(resps, cloned, strict=True):
                r.resps.append(x)
        return [self._results(prepared, positions) for prepared, positions in parts]

    def _call(self, rtype: str, reqs: list[Any]) -> list[Any]:
        if rtype == "loglikelihood" and self._pretokenize and all(len(r.args) == 2 for r in reqs):
            tokens = [self.encoded(r) for r in reqs]
            if self._shared is not None:  # one forward pass per shared context (multiple choice)
                return self._shared(tokens)
            return self.lm._loglikelihood_tokens(tokens, disable_tqdm=True)
        if rtype not in REQUEST_TYPES:
            raise ValueError(f"unknown lm-eval request type {rtype!r}")
        from lm_eval.api.model import TemplateLM

        if isinstance(self.lm, TemplateLM):  # its methods take disable_tqdm; the base LM's do not
            return getattr(self.lm, rtype)(reqs, disable_tqdm=True)
        return getattr(self.lm, rtype)(reqs)

    def encoded(self, inst: Any) -> tuple:
        """((context, continuation), context tokens, continuation tokens) of a loglikelihood request, as
        `TemplateLM.loglikelihood` tokenises it (an empty context becomes the LM's prefix token)."""
        hit = self._encoded.get(id(inst))
        if hit is not None and hit[0] is inst:
            return hit[1]
        lm = self.lm
        context, continuation = inst.args
        if context == "":
            cont = lm.tok_encode(continuation, add_special_tokens=False)
            ctx, cont = ([lm.prefix_token_id], cont) if lm.prefix_token_id != cont[0] else (cont[:1], cont[1:])
        else:
            ctx, cont = lm._encode_pair(context, continuation)
        enc = ((context, continuation), ctx, cont)
        self._encoded[id(inst)] = (inst, enc)
        return enc

    def _results(self, prepared: PreparedTask, positions: Sequence[int]) -> TaskRun:
        task = prepared.task
        scored = [prepared.items[p] for p in positions]
        instances = [i for it in scored for i in it.instances]
        filters = list(getattr(task, "_filters", []))
        if instances:
            for f in filters:
                f.apply(instances)
        run = TaskRun(prepared)
        for it in scored:
            metrics: dict[tuple[str, str], Any] = {}
            for key in (f.name for f in filters):
                out = task.process_results(it.doc, [i.filtered_resps[key] for i in it.instances])
                for m, v in out.items():
                    metrics[(m, key)] = v
            tokens = [len(self.encoded(i)[2]) if i.request_type == "loglikelihood" and self._pretokenize
                      and len(i.args) == 2 else None for i in it.instances]
            run.items.append(ItemResult(it.doc_id, it.doc, metrics, [list(i.resps) for i in it.instances], tokens))
        return run


def score(engine: Engine, prepared: Sequence[PreparedTask], chunk: int | None = None,
          on_run: Callable[[TaskRun], None] | None = None) -> dict[str, TaskRun]:
    """Score every item of `prepared` (all tasks), `chunk` items of each task per engine call (None: one call).

    Chunk k holds items [k*chunk, (k+1)*chunk) of every task, so early chunks sample every task alike.
    `on_run(run)` sees each chunk's TaskRun as it is scored (per-item reports; it may raise to stop).

    Returns:
        task name -> all its scored items (in order) as one TaskRun.
    """
    longest = max((len(p) for p in prepared), default=0)
    step = chunk or longest or 1
    runs: dict[str, list[TaskRun]] = {p.name: [] for p in prepared}
    for start in range(0, longest, step):
        parts = [(p, range(start, min(start + step, len(p)))) for p in prepared if start < len(p)]
        for (p, _), run in zip(parts, engine.run(parts), strict=True):
            runs[p.name].append(run)
            if on_run is not None:
                on_run(run)
    return {name: merge_runs(r) if r else TaskRun(next(p for p in prepared if p.name == name))
            for name, r in runs.items()}


def merge_runs(runs: Sequence[TaskRun]) -> TaskRun:
    """One TaskRun with the items of several (chunks of the same prepared task), in order."""
    out = TaskRun(runs[0].prepared)
    for r in runs:
        out.items.extend(r.items)
    return out


def _can_pretokenize(lm: Any) -> bool:
    """True when `lm.loglikelihood` is TemplateLM's (HFLM only adds a check): tokenise, then
    `_loglikelihood_tokens`. Any other LM gets its own `loglikelihood` called every time."""
    from lm_eval.api.model import TemplateLM

    if not isinstance(lm, TemplateLM) or getattr(lm, "enable_thinking", False):
        return False
    known = [TemplateLM.loglikelihood]
    try:
        from lm_eval.models.huggingface import HFLM

        known.append(HFLM.loglikelihood)
    except ImportError:  # pragma: no cover - HFLM ships with lm-eval
        pass
    return type(lm).loglikelihood in known

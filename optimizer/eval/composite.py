"""Several evaluators as one: e.g. 0.7 x JGLUE + 0.3 x an LLM judge, or one objective per evaluator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf

from optimizer import UserError
from optimizer.eval import build_evaluator, register_evaluator
from optimizer.eval.base import SPLITS, Scores


class CompositeEvaluator:
    """Runs each part and reports its tasks as `<part>/<task>`.

    The default objective weights part p's task t by `part_weight[p] * w_t / sum(w of p's tasks)`, so
    `part_weights: {jglue: 0.7, judge: 0.3}` means 0.7 x (JGLUE mean) + 0.3 x (judge score).
    """

    name = "composite"

    def __init__(self, node: Any, context: dict[str, Any]):
        parts = node.get("parts") or {}
        if not parts:
            raise UserError("evaluator.parts is empty: give each part an evaluator config, e.g. "
                            "parts: {lm: {name: lm_eval, tasks: [...]}, judge: {name: mt_bench, ...}}.")
        self.parts = {name: build_evaluator(p, context) for name, p in parts.items()}
        pw = dict(node.get("part_weights") or {p: 1.0 for p in self.parts})
        unknown = [p for p in pw if p not in self.parts]
        if unknown or any(v < 0 for v in pw.values()) or sum(pw.values()) <= 0:
            raise UserError(f"evaluator.part_weights={pw} must give non-negative weights (some positive) to the "
                            f"parts {sorted(self.parts)}.")
        self.part_weights = {p: float(pw.get(p, 0.0)) for p in self.parts}

    @property
    def weights(self) -> dict[str, float]:
        out = {}
        for p, ev in self.parts.items():
            inner = dict(ev.weights)
            total = sum(inner.values()) or 1.0
            out.update({f"{p}/{t}": self.part_weights[p] * w / total for t, w in inner.items()})
        return out

    def splits(self) -> tuple[str, ...]:
        per = [set(ev.splits()) for ev in self.parts.values()]
        return tuple(s for s in SPLITS if all(s in x for x in per))

    @property
    def chunk_size(self) -> int:
        return max(ev.chunk_size for ev in self.parts.values())

    def close(self) -> None:
        for ev in self.parts.values():
            ev.close()

    def validate(self) -> None:
        for ev in self.parts.values():
            ev.validate()

    def evaluate(self, model: Any, tokenizer: Any, split: str, *, on_item: Callable | None = None) -> Scores:
        out = Scores(tasks={})
        for p, ev in self.parts.items():
            hook = (lambda t, i, v, p=p: on_item(f"{p}/{t}", i, v)) if on_item else None
            sc = ev.evaluate(model, tokenizer, split, on_item=hook)
            out.tasks.update({f"{p}/{k}": v for k, v in sc.tasks.items()})
            out.metrics.update({f"{p}/{k}": v for k, v in sc.metrics.items()})
            out.items.update({f"{p}/{k}": v for k, v in sc.items.items()})
            out.info.update({f"{p}.{k}": v for k, v in sc.info.items()})
            out.artifacts.update({f"{p}-{k}": v for k, v in sc.artifacts.items()})
        return out


@register_evaluator("composite")
def build(node: Any, context: dict[str, Any]) -> CompositeEvaluator:
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    return CompositeEvaluator(node, context)

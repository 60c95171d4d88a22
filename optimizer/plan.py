"""MergePlan: the per-tensor coefficients of one merge, as frozen, serialisable data.

A plan is what a trial decides and what a recipe states. Values are mergekit-style rule lists: for each
parameter (per model, or global) an ordered list of (filter, value); the first rule whose filter is a
substring of the tensor name wins, and a rule without filter matches every tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Rules = tuple[tuple[str | None, float], ...]


def first_match(rules: Rules, tensor_name: str, what: str) -> float:
    for flt, value in rules:
        if flt is None or flt in tensor_name:
            return value
    raise KeyError(f"no rule of {what} matches tensor {tensor_name!r}")


@dataclass(frozen=True)
class MergePlan:
    """Everything needed to materialise one merge, given the resident tensors.

    Args:
        method: merge method name (registry key).
        models: model names in task-vector order.
        model_params: param -> model -> rules (e.g. weight, density).
        global_params: param -> rules (e.g. t, lambda).
        options: non-numeric method options (e.g. {"rescale": "l1"}), passed through to the kernel.
    """

    method: str
    models: tuple[str, ...]
    model_params: Mapping[str, Mapping[str, Rules]] = field(default_factory=dict)
    global_params: Mapping[str, Rules] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def resolve(self, tensor_name: str) -> tuple[dict[str, list[float]], dict[str, Any]]:
        """Per-model and global parameter values for one tensor."""
        mp = {p: [first_match(by_model[m], tensor_name, f"{p}/{m}") for m in self.models]
              for p, by_model in self.model_params.items()}
        gp: dict[str, Any] = {p: first_match(r, tensor_name, p) for p, r in self.global_params.items()}
        gp.update(self.options)
        return mp, gp

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "models": list(self.models),
            "model_params": {p: {m: [_rule_out(r) for r in rules] for m, rules in by.items()}
                             for p, by in self.model_params.items()},
            "global_params": {p: [_rule_out(r) for r in rules] for p, rules in self.global_params.items()},
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MergePlan:
        return cls(
            method=d["method"],
            models=tuple(d["models"]),
            model_params={p: {m: tuple(_rule_in(r) for r in rules) for m, rules in by.items()}
                          for p, by in d.get("model_params", {}).items()},
            global_params={p: tuple(_rule_in(r) for r in rules)
                           for p, rules in d.get("global_params", {}).items()},
            options=dict(d.get("options", {})),
        )

    def to_mergekit(self, sources: Mapping[str, str], base_model: str, dtype: str | None = None,
                    extension: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A mergekit YAML document (as a dict) that states this plan.

        Values take mergekit's types: `normalize` / `filter_wise` become booleans and `rescale` 1 (L1 norm
        matching) becomes `true`. Rescale 2 (divide by the keep probability) has no mergekit equivalent:
        the document says `rescale: true` (mergekit's nearest, L1) and records `rescale: inverse_density`
        under the `merge_optimizer` key, which mergekit ignores and `python -m optimizer.merge` applies.
        Linear recipes name the base there too: mergekit's linear takes no base model.

        Args:
            sources: model name -> the reference mergekit should load (path or hub id).
            base_model: reference of the base model.
            dtype: output dtype name for mergekit (`float32`, `bfloat16`, ...).
            extension: extra entries for the `merge_optimizer` key (e.g. seed and trial of random masks).
        """
        models = []
        for m in self.models:
            params = {p: _mk_value(p, by[m]) for p, by in self.model_params.items()}
            models.append({"model": sources[m], "parameters": params})
        doc: dict[str, Any] = {"merge_method": self.method, "base_model": base_model, "models": models}
        ext = dict(extension or {})
        if self.method == "linear" and "target" not in ext:
            # mergekit's linear averages every input and would add base_model as one (with no weight: an
            # error); the result does not depend on it, but our tool re-applies bit-exactly from the same base
            del doc["base_model"]
            ext["base"] = base_model
        gparams = {p: _mk_value(p, r) for p, r in self.global_params.items()}
        gparams.update(self.options)
        if "rescale" in gparams:
            gparams["rescale"], inverse = _mk_rescale(gparams["rescale"])
            if inverse:
                ext["rescale"] = "inverse_density"
        if gparams:
            doc["parameters"] = gparams
        if dtype:
            doc["dtype"] = dtype
        if ext:
            doc[MERGEKIT_EXTENSION] = ext
        return doc


# Top-level recipe key for what mergekit cannot state (mask seeds, chat-vector target, inverse-density
# rescale); mergekit's config schema ignores unknown top-level keys, `python -m optimizer.merge` reads it.
MERGEKIT_EXTENSION = "merge_optimizer"
_MK_BOOLS = ("normalize", "filter_wise", "int8_mask")


def _mk_rescale(value: Any) -> tuple[Any, bool]:
    """(mergekit's value of a `rescale` setting, whether it asks for inverse-density rescaling)."""
    named = {"none": False, "l1": True}
    values = [e["value"] for e in value] if isinstance(value, list) else [value]
    ours = [v for v in values if not isinstance(v, bool) and v not in named]  # 2 / "inverse_density"
    if not ours:
        if isinstance(value, list):
            return [e | {"value": named.get(e["value"], e["value"])} for e in value], False
        return named.get(value, value), False
    if len(ours) != len(values):
        raise ValueError(f"rescale rules {values} mix inverse-density with other modes; mergekit cannot state that")
    return True, True


def constant(value: float) -> Rules:
    return ((None, float(value)),)


def _rule_out(rule: tuple[str | None, float]) -> dict[str, Any]:
    flt, value = rule
    return {"value": value} if flt is None else {"filter": flt, "value": value}


def _rule_in(d: Mapping[str, Any]) -> tuple[str | None, float]:
    return (d.get("filter"), float(d["value"]))


def _mk_value(param: str, rules: Rules) -> Any:
    """mergekit accepts a scalar, or a list of {filter, value} with a final default entry; booleans for
    its boolean parameters (rescale 2 stays numeric here and is rewritten by `to_mergekit`)."""
    def conv(v: float) -> Any:
        if param in _MK_BOOLS or (param == "rescale" and v <= 1.5):
            return bool(round(v))
        return v

    if len(rules) == 1 and rules[0][0] is None:
        return conv(rules[0][1])
    return [{"value": conv(v)} if f is None else {"filter": f, "value": conv(v)} for f, v in rules]

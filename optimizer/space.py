"""The search space, derived from tensor names, the granularity and the merge method's declared params.

Nothing here lists architectures: decoder layers are found by the `<prefix>.layers.<i>.` pattern that
Llama, Mistral, Qwen2 and Gemma checkpoints share (GPT-style `.h.<i>.` and `.blocks.<i>.` too).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optimizer import UserError
from optimizer.plan import MergePlan, Rules

_LAYER = re.compile(r"^(?P<prefix>.*?\.(?:layers|h|blocks)\.)(?P<idx>\d+)\.(?P<leaf>.+)$")


def _short(name: str) -> str:
    """Readable unit name of a tensor: drop the `model.` prefix and the `.weight` suffix."""
    name = name.removeprefix("model.")
    return name.removesuffix(".weight")


@dataclass(frozen=True)
class Group:
    """Tensors that always share one value, stated in a recipe by one mergekit filter."""

    filter: str
    tensors: tuple[str, ...]
    mix: tuple[tuple[int, float], ...]  # (unit index, coefficient): value = sum(coef * unit value)


@dataclass(frozen=True)
class Layout:
    """Units (what is searched) and groups (how unit values reach tensors) for one granularity."""

    granularity: str
    units: tuple[str, ...]
    groups: tuple[Group, ...]


def _sort_key(name: str) -> tuple[int, int, str]:
    m = _LAYER.match(name)
    if m:
        return (1, int(m["idx"]), name)
    return (0 if "embed" in name or name.startswith("wte") else 2, 0, name)


def derive_layout(tensor_names: Sequence[str], granularity: str) -> Layout:
    """Build the units of `granularity` (`all`, `layer`, `parameter`, `block:K`, `gradient:K`)."""
    names = sorted(tensor_names, key=_sort_key)
    kind, _, arg = granularity.partition(":")
    if kind in ("block", "gradient"):
        if not arg.isdigit() or int(arg) < 1:
            raise UserError(f"mode.granularity={granularity!r}: {kind}:K needs a positive integer K, "
                            f"e.g. {kind}:4.")
    elif arg or kind not in ("all", "layer", "parameter"):
        raise UserError(f"mode.granularity={granularity!r} is unknown; use all, layer, parameter, "
                        "block:K or gradient:K.")
    if kind == "gradient":
        return _gradient(names, int(arg))
    units: dict[str, int] = {}
    groups: dict[str, tuple[int, list[str]]] = {}  # filter -> (unit index, tensors), first-seen order
    for n in names:
        unit, flt = _unit_of(n, kind, int(arg or 1))
        ui = units.setdefault(unit, len(units))
        groups.setdefault(flt, (ui, []))[1].append(n)
    return Layout(granularity, tuple(units),
                  tuple(Group(f, tuple(ts), ((ui, 1.0),)) for f, (ui, ts) in groups.items()))


def _unit_of(name: str, kind: str, k: int) -> tuple[str, str]:
    """(unit name, mergekit filter of the group the tensor belongs to)."""
    m = _LAYER.match(name)
    if kind == "all" or not m:
        return _short(name), name
    layer_filter = f"{m['prefix']}{m['idx']}."
    if kind == "layer":
        return f"layer.{m['idx']}", layer_filter
    if kind == "block":  # a block spans several layers; the recipe states one rule per layer
        return f"block.{int(m['idx']) // k}", layer_filter
    return m["leaf"].removesuffix(".weight"), f".{m['leaf']}"


def _layers(names: Sequence[str]) -> dict[int, tuple[str, list[str]]]:
    out: dict[int, tuple[str, list[str]]] = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            out.setdefault(int(m["idx"]), (f"{m['prefix']}{m['idx']}.", []))[1].append(n)
    return out


def _gradient(names: Sequence[str], k: int) -> Layout:
    """K anchors spread evenly over the layers, linearly interpolated; non-layer tensors take anchor 0.

    This is what mergekit does with gradient lists (checked against mergekit 0.1.5 by
    tests/merge/test_mergekit_oracle.py): embeddings, final norm and lm_head all take the first value.
    """
    layers = _layers(names)
    n_layers = max(layers) + 1 if layers else 1
    units = tuple(f"anchor.{j}" for j in range(k))
    groups = []
    for n in names:
        if not _LAYER.match(n):
            groups.append(Group(n, (n,), ((0, 1.0),)))
    for idx, (flt, ts) in sorted(layers.items()):
        groups.append(Group(flt, tuple(ts), _interp(idx, n_layers, k)))
    return Layout(f"gradient:{k}", units, tuple(sorted(groups, key=lambda g: _sort_key(g.tensors[0]))))


def _interp(idx: int, n_layers: int, k: int) -> tuple[tuple[int, float], ...]:
    if k == 1 or n_layers == 1:
        return ((0, 1.0),)
    pos = idx / (n_layers - 1) * (k - 1)
    lo = min(int(pos), k - 2)
    frac = pos - lo
    return tuple((j, c) for j, c in ((lo, 1.0 - frac), (lo + 1, frac)) if c > 0.0) or ((lo, 1.0),)


@dataclass(frozen=True)
class SearchParam:
    """One Optuna parameter: `weight/<model>/<unit>` (per-model) or `t/<unit>` (global)."""

    name: str
    param: str
    model: str | None
    unit: int
    low: float
    high: float
    log: bool


class SearchSpace:
    """Named Optuna parameters for a method at a granularity, and their mapping to a MergePlan."""

    def __init__(self, method: Any, models: Sequence[str], layout: Layout, merge_cfg: Any):
        self.method = method
        self.models = tuple(models)
        self.layout = layout
        declared = {p.name: p for p in method.params}
        searched = list(merge_cfg.search) if merge_cfg.search is not None else [
            p.name for p in method.params if p.searchable]
        self.pinned = _check_pinned(declared, merge_cfg.params, self.models, searched)
        self.params: list[SearchParam] = []
        for pname in [p.name for p in method.params if p.name in searched]:  # declared order, stable
            spec = declared[pname]
            low, high = _bounds(spec, merge_cfg.bounds.get(pname))
            log = bool(merge_cfg.log.get(pname, spec.log))
            if log and low <= 0:
                raise UserError(f"merge.log.{pname}=true needs a positive lower bound, got {low}.")
            owners = self.models if spec.scope == "model" else (None,)
            for model in owners:
                for ui, unit in enumerate(layout.units):
                    name = f"{pname}/{model}/{unit}" if model else f"{pname}/{unit}"
                    self.params.append(SearchParam(name, pname, model, ui, low, high, log))
        unknown = [p for p in searched if p not in declared]
        if unknown:
            raise UserError(f"merge.search names {unknown[0]!r}, which method {method.name!r} does not "
                            f"declare; it declares {sorted(declared)}.")
        self.searched = tuple(searched)

    def __len__(self) -> int:
        return len(self.params)

    def suggest(self, trial: Any) -> dict[str, float]:
        """Ask the trial for every parameter, in a fixed order."""
        return {p.name: trial.suggest_float(p.name, p.low, p.high, log=p.log) for p in self.params}

    def baseline(self, values: Mapping[str, float]) -> dict[str, float]:
        """Parameter values of a baseline: `{param: v}` for every unit/model; unnamed params -> default."""
        declared = {p.name: p for p in self.method.params}
        for k in values:
            if k not in declared:
                raise UserError(f"merge.baselines names {k!r}, not a parameter of {self.method.name!r}.")
        return {p.name: float(values.get(p.param, declared[p.param].default)) for p in self.params}

    def distributions(self) -> dict[str, Any]:
        import optuna

        return {p.name: optuna.distributions.FloatDistribution(p.low, p.high, log=p.log) for p in self.params}

    def plan(self, values: Mapping[str, float]) -> MergePlan:
        """The MergePlan stated by a full set of parameter values (a trial's params)."""
        model_params: dict[str, dict[str, Rules]] = {}
        global_params: dict[str, Rules] = {}
        by_key = {(p.param, p.model): [] for p in self.params}
        for p in self.params:
            by_key[(p.param, p.model)].append(values[p.name])
        for spec in self.method.params:
            if spec.scope == "model":
                model_params[spec.name] = {m: self._rules(spec, by_key.get((spec.name, m)), m)
                                           for m in self.models}
            else:
                global_params[spec.name] = self._rules(spec, by_key.get((spec.name, None)), None)
        return MergePlan(self.method.name, self.models, model_params, global_params)

    def _rules(self, spec: Any, unit_values: list[float] | None, model: str | None) -> Rules:
        if unit_values is None:
            pinned = self.pinned.get(spec.name, spec.default)
            value = pinned[model] if isinstance(pinned, dict) else pinned
            return ((None, float(value)),)
        rules = [(g.filter, float(sum(c * unit_values[u] for u, c in g.mix))) for g in self.layout.groups]
        if len({v for _, v in rules}) == 1:  # one value everywhere: state it once
            return ((None, rules[0][1]),)
        return tuple(rules)

    def describe(self) -> dict[str, Any]:
        """What a stored study must agree with to be resumed with this space."""
        return {"method": self.method.name, "granularity": self.layout.granularity,
                "models": list(self.models), "params": [p.name for p in self.params],
                "pinned": {k: v for k, v in self.pinned.items()}}


def _bounds(spec: Any, override: Sequence[float] | None) -> tuple[float, float]:
    if override is None:
        return float(spec.search_low), float(spec.search_high)
    if len(override) != 2:
        raise UserError(f"merge.bounds.{spec.name}={list(override)} must be [low, high].")
    try:
        low, high = float(override[0]), float(override[1])
    except (TypeError, ValueError):
        raise UserError(f"merge.bounds.{spec.name}={list(override)} must be two numbers [low, high].") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise UserError(f"merge.bounds.{spec.name}=[{low}, {high}] must be finite numbers.")
    if low > high:
        raise UserError(f"merge.bounds.{spec.name}=[{low}, {high}]: low is greater than high; "
                        f"write [{high}, {low}].")
    if low < spec.low or high > spec.high:
        raise UserError(f"merge.bounds.{spec.name}=[{low}, {high}] leaves the valid range "
                        f"[{spec.low}, {spec.high}] of {spec.name}.")
    return low, high


def _check_pinned(declared: Mapping[str, Any], pinned: Mapping[str, Any], models: Sequence[str],
                  searched: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in (pinned or {}).items():
        if name not in declared:
            raise UserError(f"merge.params.{name} is not a parameter of this method; it declares "
                            f"{sorted(declared)}.")
        if name in searched:
            raise UserError(f"merge.params.{name} is pinned but also searched; remove it from merge.params "
                            "or from merge.search.")
        spec = declared[name]
        values = dict(value) if isinstance(value, Mapping) else {None: value}
        for m, v in values.items():
            if m is not None and m not in models:
                raise UserError(f"merge.params.{name}.{m}: no model named {m!r}; models are {list(models)}.")
            if not spec.low <= float(v) <= spec.high:
                raise UserError(f"merge.params.{name}={v} is outside the valid range [{spec.low}, {spec.high}].")
        if isinstance(value, Mapping):
            missing = [m for m in models if m not in values]
            if missing:
                raise UserError(f"merge.params.{name} gives no value for model {missing[0]!r}.")
            out[name] = {m: float(values[m]) for m in models}
        else:
            out[name] = float(value)
    return out

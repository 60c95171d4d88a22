"""What a merge method is: its declared parameters and every fact about it, as frozen data.

``optimizer.merge.registry`` instantiates these for each method; search space, recipe reader and writer, the
applier and the tests read the facts from there and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

_REQUIRED = None  # ParamSpec.mergekit_default when mergekit has no default (the recipe must set it)


@dataclass(frozen=True)
class ParamSpec:
    """One declared merge parameter.

    Args:
        name: the name in plans and in mergekit recipes.
        scope: "model" (one value per merged model) or "global" (one per tensor).
        default: the recommended value (baseline trials, non-searched params).
        low, high: the valid range; search_low, search_high: the default search box.
        log: sample on a log scale.
        searchable: searched by default (False: pinned to ``default`` unless ``merge.search`` names it).
        kind: the type mergekit reads ("float", "bool", "int"); plans hold floats, recipes the typed value.
        mergekit_default: what mergekit uses when a recipe omits the parameter (None: mergekit requires it).
        help: what the parameter means (README method table).
    """

    name: str
    scope: Literal["model", "global"]
    default: float
    low: float
    high: float
    search_low: float
    search_high: float
    log: bool = False
    searchable: bool = True
    kind: Literal["float", "bool", "int"] = "float"
    mergekit_default: float | None = _REQUIRED
    help: str = ""

    def check(self, value: float, where: str = "") -> None:
        """Raise ValueError if ``value`` is outside [low, high]."""
        if not self.low <= value <= self.high:
            raise ValueError(f"{self.name}={value}{where} is outside its valid range [{self.low}, {self.high}]")

    def to_mergekit(self, value: float):
        """The value as a recipe states it (bool / int / float)."""
        if self.kind == "bool":
            return bool(round(value))
        if self.kind == "int":
            return int(round(value))
        return value


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its kernel and everything else known about it.

    Args:
        name: registry key and mergekit ``merge_method``.
        params: declared parameters (searchable or pinned); ``fn`` receives exactly these.
        fn: the per-tensor kernel ``fn(base, deltas, model_params, global_params, *, generator, out, name)``.
        base: mergekit's base policy: "required" (task vectors against base_model), "optional" (with a base the
            method works on task vectors, without one on the models' weights) or "ignored" (the base is only
            the task vectors' reference; a base_model a recipe lists is merged like any other model).
        uses_base: the result is the anchor plus a function of the task vectors, so a chat-vector target and
            a frankenMoE slot (one task vector) make sense (False: the method merges the models' weights).
        stochastic: needs a seeded generator (random masks).
        min_models, max_models: models besides the base.
        mergekit: mergekit 0.1.5 implements it (recipes run there; the oracle tests compare).
        ignored_params: parameters mergekit accepts that cannot change the result (accepted, unused).
        paper: reference URL.
    """

    name: str
    params: tuple[ParamSpec, ...]
    fn: Callable = field(repr=False)
    base: Literal["required", "optional", "ignored"] = "required"
    uses_base: bool = True
    stochastic: bool = False
    min_models: int = 1
    max_models: int | None = None
    mergekit: bool = True
    ignored_params: tuple[str, ...] = ()
    paper: str = ""

    def param(self, name: str) -> ParamSpec:
        """The ParamSpec called ``name`` (KeyError naming the declared ones otherwise)."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} has no parameter {name!r}; it declares {[p.name for p in self.params]}")

    @property
    def model_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "model")

    @property
    def global_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "global")


def method(name: str, params: tuple[ParamSpec, ...], kernel: Callable, **kw) -> MergeMethod:
    """A MergeMethod whose ``fn`` fills undeclared values with defaults and range-checks declared ones."""
    return MergeMethod(name, params, partial(_call, name, params, kernel), **kw)


def _call(method_name: str, params: tuple[ParamSpec, ...], kernel: Callable, base, deltas, model_params,
          global_params, *, generator=None, out=None, name: str = ""):
    mp, gp = dict(model_params), dict(global_params)
    where = f" ({method_name}, tensor {name!r})" if name else f" ({method_name})"
    for spec in params:
        if spec.scope == "model":
            values = mp.setdefault(spec.name, [spec.default] * len(deltas))
            for v in values:
                spec.check(float(v), where)
        else:
            value = gp.setdefault(spec.name, spec.default)
            if not isinstance(value, str):
                spec.check(float(value), where)
    return kernel(base, deltas, mp, gp, generator=generator, out=out, name=name)

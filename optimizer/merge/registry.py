"""The one merge-method registry: name -> kernel + declared parameters + paper.

Search-space code reads each method's ``params`` (never a second table); the apply layer calls
``method.fn(base, deltas, model_params, global_params, generator=..., out=...)`` per tensor.

Example:
    >>> m = get_method("ties")
    >>> [p.name for p in m.model_params], [p.name for p in m.global_params]
    (['weight', 'density'], ['normalize', 'rescale'])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from optimizer.merge import kernels


@dataclass(frozen=True)
class ParamSpec:
    """One declared merge parameter.

    ``default`` is the method's recommended value (used for baseline trials and for non-searchable params);
    ``low``/``high`` bound valid values, ``search_low``/``search_high`` the default search box.
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
    help: str = ""

    def check(self, value: float, where: str = "") -> None:
        """Raise ValueError if ``value`` is outside [low, high]."""
        if not self.low <= value <= self.high:
            raise ValueError(f"{self.name}={value}{where} is outside its valid range [{self.low}, {self.high}]")


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its kernel and what it needs."""

    name: str
    params: tuple[ParamSpec, ...]
    fn: Callable = field(repr=False)
    uses_base: bool = True
    stochastic: bool = False
    min_models: int = 1
    max_models: int | None = None
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


# --- parameter declarations --------------------------------------------------------------------------------
WEIGHT = ParamSpec("weight", "model", 1.0, -10.0, 10.0, 0.0, 1.5,
                   help="scale of this model's task vector (negative: task negation, only without normalize)")
LINEAR_WEIGHT = ParamSpec("weight", "model", 1.0, 0.0, 10.0, 0.0, 1.0,
                          help="mixing weight; normalised by the sum of weights (which must be > 0)")


def _density(default: float, search_low: float = 0.1) -> ParamSpec:
    return ParamSpec("density", "model", default, 0.0, 1.0, search_low, 1.0,
                     help="fraction of the task vector kept (0 drops the model's delta; a positive density "
                          "keeps at least one element)")


GAMMA = ParamSpec("gamma", "model", 0.01, 0.0, 0.5, 0.0, 0.1,
                  help="breadcrumbs: fraction of largest-magnitude entries dropped (γ·N < 1 drops none)")
EPSILON = ParamSpec("epsilon", "global", 0.1, 0.0, 0.5, 0.01, 0.2,
                    help="DELLA: keep probability spans density±epsilon by magnitude rank (clamped to [0, 1])")
LAMBDA = ParamSpec("lambda", "global", 1.0, 0.0, 10.0, 0.5, 1.5,
                   help="DELLA: scale of the merged delta")
T = ParamSpec("t", "global", 0.5, 0.0, 1.0, 0.0, 1.0, help="slerp: 0 = base, 1 = the other model")


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", "global", float(default), 0.0, 1.0, 0.0, 1.0, searchable=False,
                     help="1: divide the merged delta by the (agreeing) weight sum; 0: plain sum")


def _rescale(default: bool) -> ParamSpec:
    return ParamSpec("rescale", "global", float(default), 0.0, 2.0, 0.0, 2.0, searchable=False,
                     help="0: none; 1: match the L1 norm of the kept delta to the original (mergekit); "
                          "2: divide by the keep probability (the papers; per element for DELLA)")


FILTER_WISE = ParamSpec("filter_wise", "global", 0.0, 0.0, 1.0, 0.0, 1.0, searchable=False,
                        help="model_stock: 1 = one interpolation ratio per output row (mergekit filter_wise)")


# --- generalized task arithmetic presets (as mergekit's registry: data, not copies) ---------------------------
def _gta(name: str, paper: str, *, sparsify: str | None, consensus: str | None, normalize: bool,
         density: float = 1.0, extra: tuple[ParamSpec, ...] = ()) -> MergeMethod:
    params: tuple[ParamSpec, ...] = (WEIGHT,)
    if sparsify is not None:
        params += (_density(density),)
    params += extra + (_normalize(normalize),)
    if sparsify is not None:
        params += (_rescale(sparsify in ("random", "della")),)
    fn = partial(kernels.gta_kernel, sparsify=sparsify, consensus=consensus)
    return _method(name, params, fn, stochastic=sparsify in ("random", "della"), paper=paper)


def _method(name: str, params: tuple[ParamSpec, ...], kernel: Callable, **kw) -> MergeMethod:
    return MergeMethod(name, params, partial(_call, name, params, kernel), **kw)


def _call(method: str, params: tuple[ParamSpec, ...], kernel: Callable, base, deltas, model_params,
          global_params, *, generator=None, out=None, name: str = ""):
    """Fill undeclared values with defaults and range-check declared ones, then run the kernel."""
    mp, gp = dict(model_params), dict(global_params)
    where = f" ({method}, tensor {name!r})" if name else f" ({method})"
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


_METHODS: tuple[MergeMethod, ...] = (
    _method("linear", (LINEAR_WEIGHT, _normalize(True)), kernels.linear_kernel,
            paper="https://arxiv.org/abs/2203.05482"),
    _gta("task_arithmetic", "https://arxiv.org/abs/2212.04089", sparsify=None, consensus=None, normalize=False),
    _method("slerp", (T,), kernels.slerp_kernel, min_models=1, max_models=1,
                paper="https://en.wikipedia.org/wiki/Slerp"),
    _gta("ties", "https://arxiv.org/abs/2306.01708", sparsify="magnitude", consensus="sum", normalize=True,
         density=0.5),
    _gta("dare_ties", "https://arxiv.org/abs/2311.03099", sparsify="random", consensus="sum", normalize=False,
         density=0.5),
    _gta("dare_linear", "https://arxiv.org/abs/2311.03099", sparsify="random", consensus=None, normalize=False,
         density=0.5),
    _gta("breadcrumbs", "https://arxiv.org/abs/2312.06795", sparsify="breadcrumbs", consensus=None,
         normalize=False, density=0.9, extra=(GAMMA,)),
    _gta("breadcrumbs_ties", "https://arxiv.org/abs/2312.06795", sparsify="breadcrumbs", consensus="sum",
         normalize=False, density=0.9, extra=(GAMMA,)),
    _gta("della", "https://arxiv.org/abs/2406.11617", sparsify="della", consensus="sum", normalize=True,
         density=0.5, extra=(EPSILON, LAMBDA)),
    _gta("della_linear", "https://arxiv.org/abs/2406.11617", sparsify="della", consensus=None, normalize=False,
         density=0.5, extra=(EPSILON, LAMBDA)),
    _method("model_stock", (FILTER_WISE,), kernels.model_stock_kernel, min_models=2,
                paper="https://arxiv.org/abs/2403.19522"),
)

METHODS: dict[str, MergeMethod] = {m.name: m for m in _METHODS}


def get_method(name: str) -> MergeMethod:
    """Look up a merge method by name.

    Args:
        name: registry key, e.g. "ties".

    Raises:
        ValueError: unknown name (the message lists the known methods).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None

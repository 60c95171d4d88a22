"""The one merge-method registry: name -> kernel + declared parameters + every fact about the method.

Search-space code reads each method's ``params`` (never a second table); recipes read mergekit's defaults and
types from them (``ParamSpec.mergekit_default``, ``ParamSpec.kind``); the apply layer calls
``method.fn(base, deltas, model_params, global_params, generator=..., out=...)`` per tensor.

Example:
    >>> m = get_method("ties")
    >>> [p.name for p in m.model_params], [p.name for p in m.global_params]
    (['weight', 'density'], ['lambda', 'normalize', 'rescale'])
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from optimizer.merge import kernels, selective, spherical, subspace
from optimizer.merge.spec import MergeMethod, ParamSpec, method

__all__ = ["METHODS", "MergeMethod", "ParamSpec", "get_method"]

# --- parameter declarations --------------------------------------------------------------------------------
WEIGHT = ParamSpec("weight", "model", 1.0, -10.0, 10.0, 0.0, 1.5,
                   help="scale of this model's task vector (negative: task negation, only without normalize)")
LINEAR_WEIGHT = ParamSpec("weight", "model", 1.0, 0.0, 10.0, 0.0, 1.0,
                          help="mixing weight; normalised by the sum of weights (which must be > 0)")
INTERP_WEIGHT = ParamSpec("weight", "model", 1.0, 0.0, 10.0, 0.0, 1.0,
                          help="interpolation weight of this model (relative: normalised by the weights' sum)")


def _density(default: float, search_low: float = 0.1) -> ParamSpec:
    return ParamSpec("density", "model", default, 0.0, 1.0, search_low, 1.0, mergekit_default=1.0,
                     help="fraction of the task vector kept (0 drops the model's delta; a positive density "
                          "keeps at least one element)")


GAMMA = ParamSpec("gamma", "model", 0.01, 0.0, 0.5, 0.0, 0.1, mergekit_default=0.01,
                  help="breadcrumbs: fraction of largest-magnitude entries dropped (γ·N < 1 drops none)")
EPSILON = ParamSpec("epsilon", "global", 0.1, 0.0, 0.5, 0.01, 0.2, mergekit_default=0.15,
                    help="DELLA: keep probability spans density±epsilon by magnitude rank (clamped to [0, 1])")
LAMBDA = ParamSpec("lambda", "global", 1.0, 0.0, 10.0, 0.5, 1.5, mergekit_default=1.0,
                   help="scale of the merged delta")
T = ParamSpec("t", "global", 0.5, 0.0, 1.0, 0.0, 1.0, help="slerp: 0 = base, 1 = the other model")


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", "global", float(default), 0.0, 1.0, 0.0, 1.0, searchable=False, kind="bool",
                     mergekit_default=float(default),
                     help="1: divide the merged delta by the (agreeing) weight sum; 0: plain sum")


def _rescale(default: bool) -> ParamSpec:
    # mergekit's rescale is a boolean (L1 matching); 2 is ours and travels as merge_optimizer.rescale
    return ParamSpec("rescale", "global", float(default), 0.0, 2.0, 0.0, 2.0, searchable=False, kind="bool",
                     mergekit_default=float(default),
                     help="0: none; 1: match the L1 norm of the kept delta to the original (mergekit); "
                          "2: divide by the keep probability (the papers; per element for DELLA)")


FILTER_WISE = ParamSpec("filter_wise", "global", 0.0, 0.0, 1.0, 0.0, 1.0, searchable=False, kind="bool",
                        mergekit_default=0.0,
                        help="model_stock: 1 = one interpolation ratio per output row (mergekit filter_wise)")
SCALE = ParamSpec("scale", "model", 1.0, -10.0, 10.0, 0.5, 1.5, mergekit_default=1.0,
                  help="passthrough: multiplies the slice's tensors")
ROW_WISE = ParamSpec("nuslerp_row_wise", "global", 0.0, 0.0, 1.0, 0.0, 1.0, searchable=False, kind="bool",
                     mergekit_default=0.0, help="nuslerp without flatten: interpolate columns (dim 0), not rows")
FLATTEN = ParamSpec("nuslerp_flatten", "global", 1.0, 0.0, 1.0, 0.0, 1.0, searchable=False, kind="bool",
                    mergekit_default=1.0, help="nuslerp: 1 = one slerp of the whole tensor, 0 = per row/column")
NORMALIZE_WEIGHTS = ParamSpec("normalize_weights", "global", 1.0, 0.0, 1.0, 0.0, 1.0, searchable=False,
                              kind="bool", mergekit_default=1.0, help="multislerp: divide the weights by their sum")
SPHERE_EPS = ParamSpec("eps", "global", 1e-8, 0.0, 1e-2, 0.0, 1e-2, searchable=False, mergekit_default=1e-8,
                       help="multislerp: numerical floor of norms")
MAX_ITER = ParamSpec("max_iter", "global", 10.0, 1.0, 1000.0, 1.0, 100.0, searchable=False, kind="int",
                     mergekit_default=10.0, help="karcher: fixed-point iterations at most")
TOL = ParamSpec("tol", "global", 1e-5, 0.0, 1.0, 0.0, 1e-2, searchable=False, mergekit_default=1e-5,
                help="karcher: convergence tolerance (and the norm below which a model has no direction)")
SELECT_TOPK = ParamSpec("select_topk", "global", 1.0, 0.0, 1.0, 0.1, 1.0, mergekit_default=1.0,
                        help="sce: fraction of elements kept, those whose task vectors vary most across models")
NEAR_T = ParamSpec("t", "global", 1e-3, 0.0, 1e3, 1e-6, 1e-1, log=True,
                   help="nearswap: distance below which the model's value is taken (weight t/|delta|, clamped)")
RAM_EPSILON = ParamSpec("epsilon", "global", 1e-5, 0.0, 1.0, 1e-8, 1e-2, log=True, mergekit_default=1e-5,
                        help="ram: |delta| above which a model counts as changing an entry")
RAM_R = ParamSpec("r", "global", 0.1, 0.0, 10.0, 0.0, 1.0, mergekit_default=0.1,
                  help="ramplus_tl: gain of the shared/unique ratio on unique entries")
RAM_ALPHA = ParamSpec("alpha", "global", 0.2, 0.0, 10.0, 0.0, 1.0, mergekit_default=0.2,
                      help="ramplus_tl: cap of the shared/unique ratio")
ALPHA = ParamSpec("alpha", "global", 1.0, 0.0, 10.0, 0.0, 2.0,
                  help="scale of the merged task vector (the papers' alpha)")
COMMON_FRACTION = ParamSpec("common_fraction", "global", 0.8, 0.0, 1.0, 0.0, 1.0, searchable=False,
                            help="iso_cts: fraction of the rank in the common subspace (trial-independent)")


# --- generalized task arithmetic presets (as mergekit's registry: data, not copies) ---------------------------
def _gta(name: str, paper: str, *, sparsify: str | None, consensus: str | None, normalize: bool,
         density: float = 1.0, extra: tuple[ParamSpec, ...] = ()) -> MergeMethod:
    params: tuple[ParamSpec, ...] = (WEIGHT,)
    if sparsify is not None:
        params += (_density(density),)
    if LAMBDA not in extra:  # mergekit takes lambda for every preset; searched by default only for DELLA
        params += (replace(LAMBDA, searchable=False),)
    params += extra + (_normalize(normalize),)
    if sparsify is not None:
        params += (_rescale(sparsify in ("random", "della")),)
    fn = partial(kernels.gta_kernel, sparsify=sparsify, consensus=consensus)
    return method(name, params, fn, stochastic=sparsify in ("random", "della"), ignored_params=("int8_mask",),
                  paper=paper)


_METHODS: tuple[MergeMethod, ...] = (
    method("linear", (LINEAR_WEIGHT, _normalize(True)), kernels.linear_kernel, base="ignored",
           paper="https://arxiv.org/abs/2203.05482"),
    _gta("task_arithmetic", "https://arxiv.org/abs/2212.04089", sparsify=None, consensus=None, normalize=False),
    method("slerp", (T,), kernels.slerp_kernel, max_models=1, paper="https://en.wikipedia.org/wiki/Slerp"),
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
    method("model_stock", (FILTER_WISE,), kernels.model_stock_kernel, min_models=2,
           paper="https://arxiv.org/abs/2403.19522"),
    method("passthrough", (SCALE,), kernels.passthrough_kernel, base="ignored", max_models=1,
           paper="https://github.com/arcee-ai/mergekit#passthrough"),
    method("nuslerp", (INTERP_WEIGHT, ROW_WISE, FLATTEN), spherical.nuslerp_kernel, base="optional",
           min_models=2, max_models=2, paper="https://github.com/arcee-ai/mergekit#nuslerp"),
    method("multislerp", (INTERP_WEIGHT, NORMALIZE_WEIGHTS, SPHERE_EPS), spherical.multislerp_kernel,
           base="optional", paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    method("karcher", (MAX_ITER, TOL), spherical.karcher_kernel, base="ignored", uses_base=False,
           paper="https://arxiv.org/abs/2603.04972"),
    method("sce", (SELECT_TOPK,), selective.sce_kernel, ignored_params=("int8_mask",),
           paper="https://arxiv.org/abs/2408.07990"),
    method("nearswap", (NEAR_T,), selective.nearswap_kernel, max_models=1,
           paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    method("arcee_fusion", (), selective.arcee_fusion_kernel, max_models=1, paper="https://arcee.ai"),
    method("ram", (RAM_EPSILON,), selective.ram_kernel, paper="https://arxiv.org/abs/2601.13572"),
    method("ramplus_tl", (RAM_R, RAM_ALPHA, RAM_EPSILON), selective.ramplus_tl_kernel,
           paper="https://arxiv.org/abs/2601.13572"),
    method("tsv_m", (replace(WEIGHT, help="scale of this model's task-singular-vector component (paper: 1)"),),
           subspace.tsv_m_kernel, mergekit=False, paper="https://arxiv.org/abs/2412.00081"),
    method("iso_c", (ALPHA,), subspace.iso_c_kernel, mergekit=False, paper="https://arxiv.org/abs/2502.04959"),
    method("iso_cts", (ALPHA, COMMON_FRACTION), subspace.iso_cts_kernel, mergekit=False,
           paper="https://arxiv.org/abs/2502.04959"),
    method("wudi", (ALPHA,), subspace.wudi_kernel, mergekit=False, paper="https://arxiv.org/abs/2503.08099"),
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

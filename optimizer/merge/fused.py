"""Compiled fused merge kernels: one pass over memory per tensor instead of one per elementary op.

The eager kernels (``tensor_ops.weighted_sum``, ``task_arithmetic._merge_chunks``) run a handful of torch ops
per cache-sized chunk: each op reads and writes its chunk once, and converting bf16 to float32 is an op of its
own. Here the same formulas are traced once by ``torch.compile`` (Inductor: a vectorised C++/OpenMP loop on
CPU, a Triton kernel on CUDA), so a tensor's base, task vectors and output are each touched once and nothing
temporary is stored. On the 137M bf16 model set of ``benchmarks/trial_cost.py`` a task-arithmetic trial
drops from ~0.5 s to ~0.16 s on one CPU thread.

What is fused: the weighted sum ``c0 * base + sum c_i delta_i`` (task arithmetic, linear, passthrough, slerp's
write, model stock, the refiner's writes) and the generalized task arithmetic with rank-window masks
(TIES / breadcrumbs magnitude masks, sign consensus ``sum``/``count``, normalisation, lambda). Random masks
(DARE, DELLA), float64 tensors, non-contiguous tensors and ``precision: storage`` stay eager. The arithmetic
is the eager kernels' in the same order, in float32, rounded once on writing; the compiler may contract a
multiply and an add into one fused multiply-add, so results can differ from the eager path in the last bit
of float32 (the last bit of bf16 for ~0.005% of elements), as mergekit's own float32 path differs from both.

Switched on per process (``enable``) by the study for large model sets (``Config.fused_kernels``); the first
call of each variant compiles it (tens of seconds on CPU, cached on disk by Inductor across processes), which
the study's warm-up merge does during loading. A variant that fails to compile switches the fused path off
with one warning and the eager kernels carry on.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Sequence

import torch

Tensor = torch.Tensor
log = logging.getLogger(__name__)

_ENABLED = False
_COMPILED: dict[str, object] = {}
_TIE_BLOCK = 1 << 16  # elements per block when locating a tie position


def available(device: torch.device) -> str | None:
    """Why the fused kernels cannot run on ``device`` (None when they can): a C++ compiler on CPU, Triton on
    CUDA, as Inductor needs."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (it comes with PyTorch's CUDA builds)"
        return None
    if device.type != "cpu":
        return f"torch.compile's Inductor backend does not target {device.type!r} here"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++, c++ or clang++) on PATH; Inductor needs one on CPU"
    return None


def enable(on: bool = True) -> None:
    """Use the fused kernels in this process (``False``: the eager kernels only)."""
    global _ENABLED
    _ENABLED = bool(on)
    if on:
        import torch._dynamo

        # each (number of models, dtypes, consensus) variant is one compiled graph of the same code object;
        # tests and multi-method benchmarks see more than Dynamo's default of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # past the limit Dynamo would run the formula uncompiled, on whole tensors (float32 temporaries the
        # size of the largest tensor); an error instead switches to the chunked eager kernels (see _run)
        torch._dynamo.config.fail_on_recompile_limit_hit = True


def enabled() -> bool:
    """Whether the fused kernels are on in this process."""
    return _ENABLED


def _compiled(name: str, fn):
    hit = _COMPILED.get(name)
    if hit is None:
        hit = _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return hit


def _run(name: str, fn, *args) -> tuple[bool, object]:
    """(True, result) of the compiled ``fn``; on any failure switch the fused path off with one warning and
    return (False, None): the caller's eager kernel then runs (and raises if the inputs are at fault)."""
    try:
        return True, _compiled(name, fn)(*args)
    except Exception as e:  # noqa: BLE001 - a compiler toolchain can fail in many ways; eager is always right
        enable(False)
        warnings.warn(f"fused merge kernels switched off, the eager kernels carry on: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}", RuntimeWarning, stacklevel=3)
        return False, None


def _usable(base: Tensor, out: Tensor, others: Sequence[Tensor]) -> bool:
    ok = _ENABLED and out.is_contiguous() and base.is_contiguous() and out.numel() == base.numel()
    return ok and all(t.is_contiguous() and t.dtype != torch.float64 for t in (base, out, *others))


def _scalars(values: Sequence[float], device: torch.device) -> Tensor:
    # values as a tensor, not Python floats: a float argument would be baked into the graph (a recompile each)
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)


# --- weighted sum -----------------------------------------------------------------------------------------

def _weighted_sum(out: Tensor, base: Tensor, deltas: list[Tensor], coefs: Tensor, scale_base: bool) -> None:
    acc = base.float()
    if scale_base:
        acc = acc * coefs[-1]
    for i, d in enumerate(deltas):
        acc = acc + d.float() * coefs[i]
    out.copy_(acc)


def weighted_sum(base: Tensor, base_coef: float, deltas: Sequence[Tensor], coefs: Sequence[float],
                 out: Tensor) -> bool:
    """``out = base_coef * base + sum(coefs[i] * deltas[i])`` in one pass; False if not done (use eager)."""
    if not _usable(base, out, deltas):
        return False
    values = [*coefs, base_coef]
    return _run("weighted_sum", _weighted_sum, out.view(-1), base.view(-1), [d.view(-1) for d in deltas],
                _scalars(values, base.device), base_coef != 1.0)[0]


# --- generalized task arithmetic with rank-window masks -----------------------------------------------------

def _window_mix(out: Tensor, base: Tensor, deltas: list[Tensor], lo: Tensor, cut_lo: Tensor, hi: Tensor,
                cut_hi: Tensor, coefs: Tensor, weights: Tensor, lam: Tensor, consensus: str | None,
                normalize: bool, upper: bool) -> None:
    # sparsify.WindowMask._segment and task_arithmetic._merge_chunks / _consensus_chunk, element-wise.
    # lo[0, i] / lo[1, i]: strict lower thresholds before / from cut_lo[i] (the second one just below the
    # first: `a > next_below(v)` is `a >= v`); hi likewise, strict upper thresholds from / before cut_hi[i].
    n = base.numel()
    pos = torch.arange(n, device=base.device, dtype=torch.int32 if n < 2**31 else torch.int64)
    acc = base.float()
    xs = []
    for i, d in enumerate(deltas):
        x = d.float()
        a = x.abs()
        keep = a > torch.where(pos < cut_lo[i], lo[0, i], lo[1, i])
        if upper:
            keep = keep & (a < torch.where(pos >= cut_hi[i], hi[0, i], hi[1, i]))
        x = x * keep.float()
        if consensus is None:
            acc = acc + x * coefs[i]
        else:
            xs.append(x * coefs[i])
    if consensus is not None:
        if consensus == "sum":
            sg = xs[0]
            for x in xs[1:]:
                sg = sg + x
        else:
            sg = torch.sign(xs[0])
            for x in xs[1:]:
                sg = sg + torch.sign(x)
        sg = torch.sign(torch.sign(sg) + 0.5)  # majority sign in {-1, +1}; a tie counts as +
        agree = [torch.clamp(x * sg, min=0) for x in xs]
        mixed = agree[0]
        for x in agree[1:]:
            mixed = mixed + x
        if normalize:
            div = torch.sign(agree[0]) * weights[0]
            for i, x in enumerate(agree[1:], 1):
                div = div + torch.sign(x) * weights[i]
            mixed = mixed / torch.clamp(div, min=1e-30)
        acc = acc + (mixed * sg) * lam
    out.copy_(acc)


def window_mix(base: Tensor, deltas: Sequence[Tensor], windows: Sequence, coefs: Sequence[float],
               weights: Sequence[float], consensus: str | None, normalize: bool, lambda_: float,
               out: Tensor) -> bool:
    """The generalized task arithmetic of ``task_arithmetic._merge_chunks`` for terms whose masks are rank
    windows (``sparsify.WindowMask`` or None = keep all), in one pass; False if not done (use eager).

    Args:
        base: base tensor.
        deltas: every model's task vector (a model that contributes nothing has an empty window).
        windows: one WindowMask or None (keep all) per model.
        coefs: each term's coefficient (weight, rescale, and without consensus lambda / divisor folded in).
        weights: each term's raw weight (the normalisation divisor of the consensus).
        consensus, normalize, lambda_: as ``task_arithmetic``.
        out: destination (may alias base).
    """
    if not deltas or not _usable(base, out, deltas):
        return False
    inf, n = float("inf"), base.numel()
    lo, hi, cl, ch = [], [], [], []
    for w in windows:
        if w is None or w.full:
            lo.append(-inf), hi.append(inf), cl.append(0), ch.append(n)
        elif w.empty:  # keeps nothing: the strict `a > inf` everywhere
            lo.append(inf), hi.append(-inf), cl.append(n), ch.append(n)
        else:
            lo.append(-inf if w.lo is None else w.lo), hi.append(inf if w.hi is None else w.hi)
            cl.append(w.cut_lo), ch.append(w.cut_hi)
    dev = base.device
    lo_t = _scalars(lo, torch.device("cpu"))
    hi_t = _scalars(hi, torch.device("cpu"))
    # a >= v is a > (the float32 below v); for v <= 0 any negative number does (no denormal thresholds)
    lo_loose = torch.where(lo_t > 0, torch.nextafter(lo_t, torch.tensor(-inf)), torch.minimum(lo_t, -torch.ones(1)))
    hi_loose = torch.nextafter(hi_t, torch.tensor(inf))  # a <= v is a < (the float32 above v)
    cut_dtype = torch.int32 if n < 2**31 else torch.int64
    cuts = torch.tensor([cl, ch], dtype=cut_dtype).to(dev)
    upper = any(h != inf for h in hi)
    return _run("window_mix", _window_mix, out.view(-1), base.view(-1), [d.view(-1) for d in deltas],
                torch.stack([lo_t, lo_loose]).to(dev), cuts[0], torch.stack([hi_t, hi_loose]).to(dev), cuts[1],
                _scalars(coefs, dev), _scalars(weights, dev), _scalars([lambda_], dev)[0], consensus, normalize,
                upper)[0]


# --- the position of the j-th tie ---------------------------------------------------------------------------

def _tie_counts(blocks: Tensor, value: Tensor) -> Tensor:
    return (blocks.float().abs() == value).sum(dim=1)


def tie_position(x: Tensor, value: float, j: int) -> int | None:
    """Flat index of the j-th (0-based) element whose float32 |x| equals ``value`` (as
    ``sparsify.tie_position``): one compiled counting pass per block of 65536, then one block searched;
    None if the fused path is off or did not run."""
    flat = x.reshape(-1)
    m = flat.numel() // _TIE_BLOCK
    if not _ENABLED or m < 2 or flat.dtype == torch.float64 or not flat.is_contiguous():
        return None
    ok, counts = _run("tie_counts", _tie_counts, flat[: m * _TIE_BLOCK].view(m, _TIE_BLOCK),
                      _scalars([value], x.device)[0])
    if not ok:
        return None
    cum = counts.cumsum(0).cpu()
    b = int(torch.searchsorted(cum, j, right=True))
    seen = int(cum[b - 1]) if b else 0
    start = b * _TIE_BLOCK
    block = flat[start: start + _TIE_BLOCK] if b < m else flat[start:]
    hits = (block.float().abs() == value).nonzero()
    if j - seen >= hits.numel():
        raise ValueError(f"fewer than {j + 1} elements equal {value}")
    return start + int(hits[j - seen])

"""Shared tensor plumbing of the merge kernels: input checks, chunked fused weighted sums, output buffers, the
working precision of whole-tensor kernels, and a per-tensor memo for trial-independent work.

The chunked kernels work chunk by chunk (``sparsify.CHUNK`` elements) in float32 and write in the output's
dtype, so a kernel holds about one chunk of temporaries per model.

Precision policy (one place): kernels compute in float32 (float64 inputs stay float64) whatever the storage
dtype, and round once when writing the result. ``precision: storage`` (a global option; recipe key
``merge_optimizer.precision``, ``python -m optimizer.merge --precision storage``) instead computes in the
tensors' own dtype, op by op as mergekit does for its group kernels (task arithmetic family, model_stock and
the methods of ``spherical``/``selective``), so bf16 merges agree with mergekit's bf16 output; mergekit's
linear and slerp work in float32 themselves, so there the option changes nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from optimizer.merge import fused
from optimizer.merge import sparsify as sp

Tensor = torch.Tensor


def check_inputs(base: Tensor, deltas: Sequence[Tensor], n_params: Sequence[Sequence[float]], name: str):
    """ValueError naming tensor ``name`` if a task vector's shape or device differs from the base's, or a
    per-model parameter list (``n_params``, None entries skipped) has the wrong length."""
    for i, d in enumerate(deltas):
        if d.shape != base.shape:
            raise ValueError(f"tensor {name or '<unnamed>'!r}: task vector {i} has shape {tuple(d.shape)}, "
                             f"base has {tuple(base.shape)}")
        if d.device != base.device:
            raise ValueError(f"tensor {name or '<unnamed>'!r}: task vector {i} is on {d.device}, base on {base.device}")
    for values in n_params:
        if values is not None and len(values) != len(deltas):
            raise ValueError(f"tensor {name or '<unnamed>'!r}: {len(values)} per-model values for {len(deltas)} models")


def out_buffer(base: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor]:
    """(result tensor, flat view to write) — a contiguous scratch copy if ``out`` is not contiguous."""
    target = torch.empty_like(base) if out is None else out
    if target.shape != base.shape:
        raise ValueError(f"out has shape {tuple(target.shape)}, expected {tuple(base.shape)}")
    flat = target.view(-1) if target.is_contiguous() else torch.empty(base.numel(), dtype=target.dtype,
                                                                          device=base.device)
    return target, flat


def finish_out(target: Tensor, flat: Tensor) -> Tensor:
    """Copy the flat result into ``target`` unless it was written there directly; returns ``target``."""
    if flat.data_ptr() != target.data_ptr() or not target.is_contiguous():
        target.copy_(flat.view(target.shape))
    return target


def weighted_sum(base: Tensor, base_coef: float, deltas: Sequence[Tensor], coefs: Sequence[float],
                 out: Tensor | None = None) -> Tensor:
    """``base_coef * base + sum(coefs[i] * deltas[i])`` in one fused chunked pass (the task-arithmetic core).

    Args:
        base: base tensor.
        base_coef: its coefficient (1 for task arithmetic).
        deltas: task vectors.
        coefs: one coefficient per task vector.
        out: optional destination (any float dtype, may alias base).
    """
    target, flat_out = out_buffer(base, out)
    fb = base.reshape(-1)
    # zero coefficients included: one compiled variant per model count, whatever a trial zeroes
    if fused.weighted_sum(fb, base_coef, [d.reshape(-1) for d in deltas], coefs, flat_out):
        return finish_out(target, flat_out)
    fds = [d.reshape(-1) for d, c in zip(deltas, coefs, strict=True) if c != 0]
    cs = [float(c) for c in coefs if c != 0]
    direct = flat_out.dtype == torch.float32  # accumulate straight into out when it is fp32
    size = min(4 * sp.CHUNK, fb.numel())
    bufs = torch.empty(2, size, device=base.device)
    for start, stop in sp.chunks(fb.numel(), 4 * sp.CHUNK):
        acc = flat_out[start:stop] if direct else bufs[0, : stop - start]
        acc.copy_(fb[start:stop])
        if base_coef != 1.0:
            acc.mul_(base_coef)
        for d, c in zip(fds, cs, strict=True):
            add_(acc, d[start:stop], c, bufs[1])
        if not direct:
            flat_out[start:stop].copy_(acc)
    return finish_out(target, flat_out)


def add_(acc: Tensor, d: Tensor, alpha: float, scratch: Tensor) -> Tensor:
    """``acc += alpha * d`` in float32; a low-precision ``d`` is converted first (a mixed-dtype add_ is ~4x
    slower on CPU than convert + add)."""
    if d.dtype != acc.dtype:
        d = scratch[: d.numel()].copy_(d)
    return acc.add_(d, alpha=alpha)


PRECISIONS = ("float32", "storage")


def precision(global_params) -> str:
    """The ``precision`` option of a call ("float32" unless the plan or recipe says "storage")."""
    value = global_params.get("precision", "float32") if global_params else "float32"
    if value not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {value!r}")
    return value


def work_dtype(t: Tensor, global_params) -> torch.dtype:
    """The dtype whole-tensor kernels compute in (see the precision policy above)."""
    if precision(global_params) == "storage":
        return t.dtype
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def finish(result: Tensor, base: Tensor, out: Tensor | None) -> Tensor:
    """Write a whole-tensor kernel's result: into ``out`` (any dtype, may alias base), else a new tensor in the
    base's dtype."""
    if out is None:
        return result.to(base.dtype)
    if out.shape != base.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(base.shape)}")
    return out.copy_(result)


_MEMO: dict[tuple, tuple[tuple[weakref.ref, ...], tuple[int, ...], Any]] = {}


def memoised(tensors: Sequence[Tensor], key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per (tensor objects, their versions, ``key``).

    Trial-independent work on resident tensors (SVDs of task vectors, histograms of |delta|) is done on
    first use and reused by every later trial; an in-place change of a tensor invalidates its entries and the
    entry is dropped when a tensor is freed. The value must not reference the tensors themselves.
    """
    k = (tuple(id(t) for t in tensors), key)
    versions = tuple(t._version for t in tensors)
    hit = _MEMO.get(k)
    if hit is not None and hit[1] == versions and all(r() is t for r, t in zip(hit[0], tensors, strict=True)):
        return hit[2]
    value = compute()
    refs = tuple(weakref.ref(t, lambda _, k=k: _MEMO.pop(k, None)) for t in tensors)
    _MEMO[k] = (refs, versions, value)
    return value


def clear_memo() -> None:
    """Drop every memoised value (a benchmark measuring several methods on the same tensors)."""
    _MEMO.clear()

"""Shared tensor plumbing of the merge kernels: input checks, chunked fused weighted sums, output buffers.

Everything works chunk by chunk (``sparsify.CHUNK`` elements) in float32 and writes in the output's dtype, so a
kernel holds about one chunk of temporaries per model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from optimizer.merge import sparsify as sp

Tensor = torch.Tensor


def check_finite(name: str, tensor: Tensor, model: str) -> None:
    """Raise ValueError naming ``model`` and tensor ``name`` if ``tensor`` holds NaN or inf."""
    flat = tensor.reshape(-1)
    for start, stop in sp.chunks(flat.numel()):
        bad = int(torch.count_nonzero(~torch.isfinite(flat[start:stop])))
        if bad:
            raise ValueError(f"tensor {name!r} of model {model!r} has non-finite values (NaN/inf), "
                             f"first bad chunk at element {start}: {bad} values")


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

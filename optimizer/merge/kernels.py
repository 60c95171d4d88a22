"""Merge kernels: pure per-tensor functions on (base, task vectors), chunked and fused.

All kernels take the base tensor and resident task vectors ``deltas[i] = theta_i - base`` (never modified),
compute in float32 chunk by chunk (``sparsify.CHUNK`` elements) so a merge holds about one chunk of
temporaries per model (plus, for random/DELLA masks, one bool per element per model), and write the result in
``out``'s dtype (``out`` may alias ``base`` or be a live bf16 parameter).

The generalized task-arithmetic family (``task_arithmetic``, ``gta_kernel``) lives in
``optimizer.merge.task_arithmetic`` and the shared chunked plumbing in ``optimizer.merge.tensor_ops``; both are
re-exported here. Registry adapters (``gta_kernel``, ``linear_kernel``, ...) share the calling convention
``fn(base, deltas, model_params, global_params, *, generator=None, out=None, name="")``.

Deliberate differences from mergekit (see also sparsify.py):
- Shape mismatches raise ValueError naming the tensor (mergekit logs and skips the model, or crops embeddings).
- Normalisation with a negative weight raises (the per-element divisor can pass through 0); linear with a
  weight sum <= 1e-8 raises (mergekit divides by it). All-zero weights under TIES-style normalisation give the
  base, as mergekit's divisor 0 -> 1 does.
- model_stock: where 1 + (N-1) cos <= 1e-6 (cos <= -1/(N-1)) t is 0 instead of inf/NaN.
- slerp runs in torch on the tensors' device (mergekit: numpy on CPU); same formula and thresholds.
- DARE/DELLA need an explicit generator (reproducible trials); ``rescale`` also offers the papers'
  1/keep-probability (per element for DELLA) besides mergekit's L1 matching; lambda and epsilon are one value
  per tensor (mergekit reads epsilon per model and lambda from the first model).

Example:
    >>> import torch
    >>> base, d = torch.zeros(4), torch.ones(4)
    >>> task_arithmetic(base, [d, -d], [1.0, 0.5]).tolist()
    [0.5, 0.5, 0.5, 0.5]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from optimizer.merge import sparsify as sp
from optimizer.merge.task_arithmetic import gta_kernel, task_arithmetic
from optimizer.merge.tensor_ops import (
    add_,
    check_inputs,
    finish,
    finish_out,
    out_buffer,
    precision,
    weighted_sum,
)

__all__ = ["add_", "gta_kernel", "linear_kernel", "model_stock_kernel", "model_stock_ratio", "passthrough_kernel",
           "slerp", "slerp_coefs", "slerp_kernel", "task_arithmetic", "weighted_sum"]
Tensor = torch.Tensor


def linear_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """Linear (model soup): ``sum(w_i theta_i) / sum(w_i)`` with ``theta_i = base + delta_i``.

    With ``normalize`` 0 it is ``sum(w_i theta_i)``. A weight sum <= 1e-8 with normalisation is a ValueError
    (mergekit would divide by it).
    """
    w = [float(x) for x in model_params["weight"]]
    check_inputs(base, deltas, [w], name)
    total = sum(w)
    if bool(global_params.get("normalize", 1.0)):
        if total <= 1e-8:
            raise ValueError(f"linear merge of {name or 'tensor'!r}: weights {w} sum to {total}; "
                             "normalisation needs a positive sum")
        return weighted_sum(base, 1.0, deltas, [x / total for x in w], out)
    return weighted_sum(base, total, deltas, w, out)


def slerp_coefs(t: float, dot: float, norm0: float, norm1: float, eps: float = 1e-8) -> tuple[float, float]:
    """Coefficients (s0, s1) of ``s0 * v0 + s1 * v1`` for spherical interpolation, as mergekit's slerp:
    vectors with norm <= eps are not normalised; |cos| > 0.9995 falls back to lerp."""
    cos = dot / ((norm0 if norm0 > eps else 1.0) * (norm1 if norm1 > eps else 1.0))
    if abs(cos) > 0.9995:
        return 1.0 - t, t
    omega = math.acos(cos)
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def slerp(base: Tensor, delta: Tensor, t: float, out: Tensor | None = None) -> Tensor:
    """Slerp between ``base`` (t=0) and ``base + delta`` (t=1): one pass for the dot products, one to write.

    Args:
        base: first endpoint.
        delta: second endpoint minus the first.
        t: interpolation factor.
        out: optional destination.
    """
    fb, fd = base.reshape(-1), delta.reshape(-1)
    dot = n0 = n1 = 0.0
    for start, stop in sp.chunks(fb.numel()):
        b = fb[start:stop].float()
        v1 = fd[start:stop].to(torch.float32, copy=True).add_(b)  # a copy: never write the resident delta
        dot += float(torch.dot(b, v1))
        n0 += float(torch.dot(b, b))
        n1 += float(torch.dot(v1, v1))
    s0, s1 = slerp_coefs(t, dot, math.sqrt(n0), math.sqrt(n1))
    # s0 * base + s1 * (base + delta)
    return weighted_sum(base, s0 + s1, [delta], [s1], out)


def slerp_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """Slerp adapter: exactly one task vector (the base is the t=0 endpoint)."""
    if len(deltas) != 1:
        raise ValueError(f"slerp merges the base with exactly one model, got {len(deltas)} for {name!r}")
    check_inputs(base, deltas, [], name)
    return slerp(base, deltas[0], float(global_params["t"]), out)


def model_stock_ratio(gram: Tensor, n: int) -> Tensor:
    """Model Stock interpolation ratio t = N cos / (1 + (N-1) cos) from Gram matrices (..., N, N) of task
    vectors, cos = mean pairwise cosine (norm product clamped at 1e-6, as mergekit). Where the denominator is
    <= 1e-6 (cos <= -1/(N-1), undefined in the paper) t is 0, i.e. the base."""
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    cos = gram / (norms.unsqueeze(-1) * norms.unsqueeze(-2)).clamp_min(1e-6)
    iu = torch.triu_indices(n, n, offset=1, device=gram.device)
    c = cos[..., iu[0], iu[1]].clamp(-1, 1).mean(-1)
    den = 1 + (n - 1) * c
    return torch.where(den > 1e-6, n * c / den.clamp_min(1e-6), torch.zeros_like(c))


def model_stock_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """Model Stock: ``base + t * mean(delta_i)``; ``filter_wise`` 1 computes t per vector along the last dim."""
    n = len(deltas)
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base, got {n} for {name!r}")
    check_inputs(base, deltas, [], name)
    if precision(global_params) == "storage":
        return finish(_model_stock_storage(base, deltas, bool(global_params.get("filter_wise", 0.0))), base, out)
    if not bool(global_params.get("filter_wise", 0.0)) or base.dim() < 2:
        gram = torch.zeros(n, n, dtype=torch.float64, device=base.device)
        flats = [d.reshape(-1) for d in deltas]
        for start, stop in sp.chunks(base.numel()):
            m = torch.stack([f[start:stop].float() for f in flats])
            gram += (m @ m.T).double()
        t = float(model_stock_ratio(gram, n))
        return weighted_sum(base, 1.0, deltas, [t / n] * n, out)
    return _model_stock_rows(base, deltas, out)


def _model_stock_rows(base: Tensor, deltas: Sequence[Tensor], out: Tensor | None) -> Tensor:
    n, width = len(deltas), base.shape[-1]
    target, flat_out = out_buffer(base, out)
    rows_b, rows_o = base.reshape(-1, width), flat_out.view(-1, width)
    rows_d = [d.reshape(-1, width) for d in deltas]
    for r0, r1 in sp.chunks(rows_b.shape[0], max(1, sp.CHUNK // width)):
        m = torch.stack([d[r0:r1].float() for d in rows_d], dim=1)  # (rows, N, width)
        t = model_stock_ratio(m @ m.transpose(1, 2), n)  # (rows,)
        rows_o[r0:r1] = rows_b[r0:r1].float() + m.sum(1).mul_((t / n).unsqueeze(-1))
    return finish_out(target, flat_out)


def _model_stock_storage(base: Tensor, deltas: Sequence[Tensor], filter_wise: bool) -> Tensor:
    """Model Stock in the tensors' dtype, op by op as mergekit (``precision: storage``)."""
    w0 = base.unsqueeze(0) if filter_wise and base.dim() == 1 else base if filter_wise else base.reshape(-1)
    ws = [(base + d).reshape(w0.shape) for d in deltas]
    offs = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offs):
        for b in offs[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(base.shape)


def passthrough_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """Passthrough: the one model's tensor, times its ``scale`` (frankenmerge slices; mergekit semantics)."""
    if len(deltas) != 1:
        raise ValueError(f"passthrough takes exactly one model per slice, got {len(deltas)} for {name!r}")
    check_inputs(base, deltas, [model_params.get("scale")], name)
    scale = float(model_params.get("scale", [1.0])[0])
    if precision(global_params) == "storage":
        return finish((base + deltas[0]) * scale, base, out)
    return weighted_sum(base, scale, deltas, [scale], out)

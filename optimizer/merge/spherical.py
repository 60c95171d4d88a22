"""Spherical merges of mergekit 0.1.5: nuslerp, multislerp and the Karcher mean, as whole-tensor kernels.

Same calling convention as ``optimizer.merge.kernels``. They compute in the working dtype of the precision
policy (``tensor_ops.work_dtype``: float32 by default, the storage dtype with ``precision: storage``) and
write the result once. Semantics are mergekit's (checked against it in ``tests/merge/test_mergekit_oracle.py``):

- nuslerp: two models; t = w1 / (w0 + w1) (0.5 when the weights sum to ~0); slerp of the two task vectors
  (with a base) or of the two models (``on_weights``, a recipe without base_model), flattened by default,
  else per row (``nuslerp_row_wise``: per column, as mergekit's dim=0).
- multislerp: barycentric interpolation on the hypersphere: project the unit vectors onto the tangent space
  at their weighted mean, average there, map back, rescale by the weighted mean norm.
- karcher: the weighted (uniform) Riemannian mean of the models' directions on the unit sphere, by fixed-point
  iteration, times their mean norm. It merges the models' weights, not task vectors.

Example:
    >>> import torch
    >>> base, d = torch.zeros(3), torch.tensor([1.0, 0.0, 0.0])
    >>> nuslerp_kernel(base, [d, torch.tensor([0.0, 1.0, 0.0])], {"weight": [1.0, 1.0]}, {}).tolist()
    [0.7071067690849304, 0.7071067690849304, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from optimizer.merge.tensor_ops import check_inputs, finish, work_dtype

Tensor = torch.Tensor


def _operands(base: Tensor, deltas: Sequence[Tensor], gp) -> tuple[Tensor | None, list[Tensor]]:
    """(base or None, the vectors to interpolate) in the working dtype: task vectors when the method has a
    base, the models' weights when the recipe has none (``on_weights``)."""
    wd = work_dtype(base, gp)
    b = base.to(wd)
    if bool(gp.get("on_weights", False)):
        return None, [b + d.to(wd) for d in deltas]
    return b, [d.to(wd) for d in deltas]


def nuslerp(t: float, v0: Tensor, v1: Tensor, *, row_wise: bool = False, flatten: bool = True,
            eps: float = 1e-8) -> Tensor:
    """Spherical interpolation between v0 (t=0) and v1 (t=1) of the flattened tensors, or row by row (the
    vectors along the last dim; ``row_wise``: along dim 0). Near-colinear pairs (1 - cos^2 <= eps^2) lerp."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if row_wise and not flatten:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def nuslerp_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """nuslerp of exactly two models, t from their weights."""
    if len(deltas) != 2:
        raise ValueError(f"nuslerp merges exactly two models, got {len(deltas)} for {name!r}")
    w = [float(x) for x in model_params["weight"]]
    check_inputs(base, deltas, [w], name)
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    b, (v0, v1) = _operands(base, deltas, global_params)
    res = nuslerp(t, v0, v1, row_wise=bool(global_params.get("nuslerp_row_wise", False)),
                  flatten=bool(global_params.get("nuslerp_flatten", True)))
    return finish(res if b is None else b + res, base, out)


def multislerp_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """Multi-SLERP: barycentric interpolation of the task vectors (or models) on the hypersphere."""
    w = [float(x) for x in model_params["weight"]]
    check_inputs(base, deltas, [w], name)
    b, vs = _operands(base, deltas, global_params)
    if len(vs) == 1:
        return finish(vs[0] if b is None else b + vs[0], base, out)
    eps = float(global_params.get("eps", 1e-8))
    flat = torch.stack(vs).reshape(len(vs), -1)
    weights = torch.tensor(w, dtype=flat.dtype, device=flat.device)
    if bool(global_params.get("normalize_weights", True)):
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(vs) != 2:
            raise ValueError(f"multislerp of {name!r}: the weighted mean of the unit task vectors is zero "
                             "(antipodal vectors with balancing weights); change the weights")
        res = (flat[0] * weights[0] + flat[1] * weights[1])
    else:
        mean = mean / mean_norm
        tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * weights.view(-1, 1)).sum(0)
        tn = torch.norm(tangent) + eps
        res = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * weights).sum()
    res = res.view(base.shape)
    return finish(res if b is None else b + res, base, out)


def karcher_mean(tensors: Sequence[Tensor], max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Uniform Karcher mean on the unit sphere of the flattened tensors, times their mean norm (tensors with
    norm <= tol do not vote for the direction)."""
    if len(tensors) == 1:
        return tensors[0]
    n = len(tensors)
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [t / nm if float(nm) != 0.0 else torch.zeros_like(t) for t, nm in zip(tensors, norms, strict=True)]
    live = [i for i, nm in enumerate(norms) if float(nm) > tol]
    if not live:
        return torch.zeros_like(tensors[0])
    alphas = [1.0 / len(live)] * len(live)
    vs = [units[i] for i in live]
    mean = sum(a * u for a, u in zip(alphas, vs, strict=True))
    mn = torch.linalg.vector_norm(mean)
    mean = vs[0].clone() if float(mn) < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alphas, vs, strict=True):
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if float(tn) < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if float(un) > tol:
            mean = mean / un
    return sum(nm / n for nm in norms) * mean


def karcher_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """Karcher mean of the models' weights (base + task vector each; a listed base is a zero task vector)."""
    check_inputs(base, deltas, [], name)
    wd = work_dtype(base, global_params)
    b = base.to(wd)
    res = karcher_mean([b + d.to(wd) for d in deltas], int(round(float(global_params.get("max_iter", 10)))),
                       float(global_params.get("tol", 1e-5)))
    return finish(res, base, out)

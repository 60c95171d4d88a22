"""Element-selecting merges of mergekit 0.1.5: SCE, NearSwap, Arcee Fusion, RAM and RAM+ (tensor-local).

Whole-tensor kernels with the calling convention of ``optimizer.merge.kernels``, computed in the working dtype
of the precision policy (``tensor_ops.work_dtype``). Semantics are mergekit's (oracle-tested):

- sce: optionally keep the ``select_topk`` fraction of elements whose task vectors vary most across models,
  elect signs (sum), weight each model by its mean squared (kept) task vector, average the agreeing entries.
- nearswap: take the other model's value where it is within ``t`` of the base: weight clamp(t/|delta|, 0, 1).
- arcee_fusion: keep the model's change where its importance |delta| * KL(softmax(model) || softmax(base))
  (per row) reaches median + 1.5 IQR. Deliberate difference: exact quantiles for every size (mergekit samples
  1M elements with its global RNG above that size, so its mask is not reproducible there).
- ram / ramplus_tl: entries only one model changes (|delta| > epsilon) are kept whole, shared ones averaged
  over the models that change them; RAM+ scales a model's unique entries by 1 + r * clamp(shared/unique, 0,
  alpha).
"""

from __future__ import annotations

import torch

from optimizer.merge.tensor_ops import check_inputs, finish, work_dtype

Tensor = torch.Tensor


def _stack(base: Tensor, deltas, gp) -> tuple[Tensor, Tensor]:
    wd = work_dtype(base, gp)
    return base.to(wd), torch.stack([d.to(wd) for d in deltas])


def sign_agreement(tvs: Tensor) -> Tensor:
    """TIES sign election (sum): True where a model's entry has the majority sign (a tie counts as +)."""
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    return tvs.sign() == majority


def sce_mask(tvs: Tensor, density: float) -> Tensor:
    """1 for the ``int(density * nonzero)`` elements of largest variance across models, else 0."""
    if density >= 1:
        return torch.ones_like(tvs[0])
    if density <= 0:
        return torch.zeros_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * density)
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sce_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """SCE: select (variance top-k), calculate (weights from squared task vectors), erase (sign election)."""
    check_inputs(base, deltas, [], name)
    b, tvs = _stack(base, deltas, global_params)
    if not len(deltas):
        return finish(b, base, out)
    topk = float(global_params.get("select_topk", 1.0))
    if topk < 1:
        tvs = tvs * sce_mask(tvs, topk).unsqueeze(0)
    agree = sign_agreement(tvs).to(tvs.dtype)
    w = tvs.square().reshape(len(deltas), -1).mean(dim=1)
    total = float(w.sum())
    w = torch.ones_like(w) / len(deltas) if abs(total) < 1e-6 else w / total
    erased = w.view(-1, *[1] * base.dim()) * agree
    return finish(b + (tvs * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6), base, out)


def nearswap_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """NearSwap of the base with exactly one model, threshold ``t``."""
    if len(deltas) != 1:
        raise ValueError(f"nearswap merges the base with exactly one model, got {len(deltas)} for {name!r}")
    check_inputs(base, deltas, [], name)
    b, (d,) = _stack(base, deltas, global_params)
    w = (float(global_params["t"]) / d.abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return finish(w * (b + d) + (1 - w) * b, base, out)


def _quantile(x: Tensor, q: float) -> Tensor:
    """The sorted element at int(q * (n - 1)) (float32 index arithmetic, as mergekit)."""
    flat = x.reshape(-1)
    idx = int(torch.tensor(q, dtype=torch.float32) * (flat.numel() - 1))
    return torch.kthvalue(flat.cpu() if flat.device.type == "mps" else flat, idx + 1).values.to(x.device)


def arcee_fusion_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """Arcee Fusion of the base with exactly one model."""
    if len(deltas) != 1:
        raise ValueError(f"arcee_fusion merges the base with exactly one model, got {len(deltas)} for {name!r}")
    check_inputs(base, deltas, [], name)
    b, (d,) = _stack(base, deltas, global_params)
    theta = b + d
    p = torch.softmax(theta, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    importance = (theta - b).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    q1, median, q3 = (_quantile(importance, v) for v in (0.25, 0.5, 0.75))
    mask = (importance >= median + 1.5 * (q3 - q1)).to(b.dtype)
    return finish(b + (theta - b) * mask, base, out)


def _ram_parts(base: Tensor, deltas, gp) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    b, tvs = _stack(base, deltas, gp)
    flat = tvs.reshape(len(deltas), -1)
    nonzero = flat.abs() > float(gp.get("epsilon", 1e-5))
    counts = nonzero.sum(dim=0, keepdim=True)
    return b, flat, nonzero, counts, counts > 1, counts == 1


def ram_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """RAM: unique changes kept, shared changes averaged over the models that make them."""
    check_inputs(base, deltas, [], name)
    if not len(deltas):
        return finish(base, base, out)
    b, flat, nonzero, counts, overlap, unique = _ram_parts(base, deltas, global_params)
    z = flat * nonzero
    merged = (z * unique + z * overlap / counts.clamp(min=1)).sum(dim=0)
    return finish(b + merged.reshape(base.shape), base, out)


def ramplus_tl_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """RAM+ (tensor-local): RAM with each model's unique changes amplified by its shared/unique ratio."""
    check_inputs(base, deltas, [], name)
    if not len(deltas):
        return finish(base, base, out)
    gp = global_params
    b, flat, nonzero, counts, overlap, unique = _ram_parts(base, deltas, gp)
    eps, r, alpha = float(gp.get("epsilon", 1e-5)), float(gp.get("r", 0.1)), float(gp.get("alpha", 0.2))
    rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=eps)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    z = flat * nonzero
    merged = (z * unique * lam.unsqueeze(-1) + z * overlap / counts.clamp(min=1)).sum(dim=0)
    return finish(b + merged.reshape(base.shape), base, out)

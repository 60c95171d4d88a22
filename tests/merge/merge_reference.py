"""Straightforward full-tensor reference implementations of mergekit's merge semantics (float64, no chunking).

Written independently of optimizer.merge to check it; the only shared pieces are the random masks themselves
(drawn by optimizer.merge.sparsify with the same seed), which are tested separately for their statistics.
"""

from __future__ import annotations

import math

import torch


def keep_count(density: float, n: int) -> int:
    return 0 if density <= 0 else n if density >= 1 else max(1, int(density * n))


def stable_rank_mask(delta: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Keep elements whose stable ascending |delta| rank is in [lo, hi)."""
    order = torch.sort(delta.abs().reshape(-1).double(), stable=True).indices
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[order[lo:hi]] = True
    return mask.view(delta.shape)


def magnitude(delta, density):
    n = delta.numel()
    return stable_rank_mask(delta, n - keep_count(density, n), n)


def breadcrumbs(delta, density, gamma):
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    target, n_top = keep_count(density, n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    return stable_rank_mask(delta, n_bot, n - n_top)


def della_prob(delta, density, epsilon):
    """mergekit's rank normalisation: ranks 1..L per row, (r - min) / (max - min)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = torch.sort(rows.abs().double(), dim=1, stable=True).indices.argsort(dim=1).double() + 1
    lo, hi = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
    norm = (ranks - lo) / (hi - lo) if rows.shape[1] > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + norm * 2 * epsilon).clamp(0, 1).view(delta.shape)


def gta(base, deltas, weights, masks=None, consensus=None, normalize=False, lambda_=1.0, rescale=None,
        densities=None, gains=None):
    """Generalized task arithmetic as in mergekit's GTATask, on explicit masks."""
    ds = []
    for i, d in enumerate(deltas):
        d = d.double()
        if masks is not None and masks[i] is not None:
            kept = d * masks[i].double()
            if gains is not None:
                kept = d * gains[i].double()
            elif rescale == "l1":
                before, after = d.abs().sum(), kept.abs().sum()
                if before >= 1e-7 and after >= 1e-7:
                    kept = kept * (before / after)
            elif rescale == "inverse_density":
                kept = kept / densities[i]
            d = kept
        ds.append(d)
    D = torch.stack(ds)
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * base.dim())
    wd = D * w
    if consensus:
        sign = wd.sign()
        key = wd.sum(0) if consensus == "sum" else sign.sum(0)
        majority = torch.where(key >= 0, 1.0, -1.0).double()
        agree = sign == majority
        mixed = (wd * agree).sum(0)
        div = (w * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = w.sum(0).expand_as(mixed).clone()
        div[div.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    return base.double() + lambda_ * mixed


def linear(base, deltas, weights, normalize=True):
    thetas = [base.double() + d.double() for d in deltas]
    res = sum(w * t for w, t in zip(weights, thetas, strict=True))
    return res / sum(weights) if normalize else res


def slerp(base, delta, t):
    """mergekit's slerp (numpy float32 there; float64 here)."""
    v0, v1 = base.double().reshape(-1), (base.double() + delta.double()).reshape(-1)
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > 1e-8 else v0
    u1 = v1 / n1 if n1 > 1e-8 else v1
    dot = float((u0 * u1).sum())
    if abs(dot) > 0.9995:
        res = (1 - t) * v0 + t * v1
    else:
        th = math.acos(dot)
        res = math.sin(th - th * t) / math.sin(th) * v0 + math.sin(th * t) / math.sin(th) * v1
    return res.view(base.shape)


def model_stock(base, deltas, filter_wise=False):
    """mergekit's ModelStockMergeTask on (base, base + delta_i)."""
    w0 = base.double()
    ws = [w0 + d.double() for d in deltas]
    shape = w0.shape
    if filter_wise and w0.dim() >= 2:
        pass
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offs = [w - w0 for w in ws]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            np_ = offs[i].norm(dim=-1) * offs[j].norm(dim=-1)
            cos.append(((offs[i] * offs[j]).sum(-1) / np_.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


# --- mergekit 0.1.5's newer methods, full-tensor transcriptions (float32 as mergekit computes fp32 inputs) ---
def passthrough(base, delta, scale):
    return (base.double() + delta.double()) * scale


def nuslerp(t, v0, v1, flatten=True, row_wise=False):
    """mergekit's nuslerp: flattened (default) or per row (dim -1) / per column (row_wise, dim 0)."""
    v0, v1 = v0.double(), v1.double()
    if flatten:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        a, b = v0.T.reshape(v0.shape[-1], -1), v1.T.reshape(v1.shape[-1], -1)
    else:
        a, b = v0.reshape(-1, v0.shape[-1]), v1.reshape(-1, v1.shape[-1])
    out = torch.empty_like(a)
    for i in range(a.shape[0]):
        x, y = a[i], b[i]
        cos = float((x / x.norm().clamp(min=1e-7) * (y / y.norm().clamp(min=1e-7))).sum().clamp(-1, 1))
        if 1 - cos * cos <= 1e-16:
            out[i] = (1 - t) * x + t * y
        else:
            th = math.acos(cos)
            out[i] = (math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th)
    if flatten:
        return out.reshape(v0.shape)
    return out.reshape(v0.shape[-1], -1).T.reshape(v0.shape) if row_wise else out.reshape(v0.shape)


def multislerp(vs, weights, eps=1e-8):
    """Barycentric interpolation on the sphere: tangent space at the weighted mean of unit vectors."""
    flat = [v.double().reshape(-1) for v in vs]
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    norms = torch.stack([f.norm() for f in flat])
    units = [f / (n + eps) for f, n in zip(flat, norms, strict=True)]
    mean = sum(wi * u for wi, u in zip(w, units, strict=True))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units, strict=True))
    tn = tangent.norm() + eps
    res = mean * torch.cos(tn) + tangent * torch.sin(tn) / tn
    return (res * (norms * w).sum()).reshape(vs[0].shape)


def karcher(thetas, max_iter=10, tol=1e-5):
    """Uniform Karcher mean on the unit sphere by fixed-point iteration, times the mean norm."""
    flat = [t.double().reshape(-1) for t in thetas]
    norms = [float(f.norm()) for f in flat]
    units = [f / n for f, n in zip(flat, norms, strict=True) if n > tol]
    mean = sum(units) / len(units)
    mean = mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            c = float((mean @ u).clamp(-1, 1))
            th = math.acos(c)
            if th >= tol:
                tangent += (th / math.sin(th)) * (u - c * mean) / len(units)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        mean = mean / mean.norm()
    return (sum(norms) / len(norms) * mean).reshape(thetas[0].shape)


def sce(base, deltas, topk):
    tv = torch.stack([d.float() for d in deltas])
    if topk < 1:
        var = tv.var(dim=0, unbiased=False).reshape(-1)
        k = int(int((var != 0).sum()) * topk)
        mask = torch.zeros_like(var)
        mask[torch.sort(var, descending=True, stable=True).indices[:k]] = 1
        tv = tv * mask.view(base.shape)
    majority = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
    agree = (tv.sign() == majority).float()
    w = tv.square().reshape(len(deltas), -1).mean(1)
    w = w / w.sum()
    ew = w.view(-1, *[1] * base.dim()) * agree
    return base.double() + ((tv * ew).sum(0) / ew.sum(0).clamp(min=1e-6)).double()


def nearswap(base, delta, t):
    w = (t / delta.double().abs().clamp(min=1e-6)).clamp(0, 1)
    return base.double() + w * delta.double()


def arcee_fusion(base, delta):
    b, theta = base.float(), base.float() + delta.float()
    p, q = torch.softmax(theta, -1) + 1e-8, torch.softmax(b, -1) + 1e-8
    imp = (theta - b).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    s = torch.sort(imp.reshape(-1)).values
    q1, med, q3 = (s[int(torch.tensor(v) * (s.numel() - 1))] for v in (0.25, 0.5, 0.75))
    return b.double() + ((theta - b) * (imp >= med + 1.5 * (q3 - q1))).double()


def ram(base, deltas, epsilon, r=None, alpha=None):
    """RAM (r None) or RAM+ tensor-local, element by element in float64."""
    tv = torch.stack([d.double().reshape(-1) for d in deltas])
    nz = tv.abs() > epsilon
    count = nz.sum(0)
    out = torch.zeros(tv.shape[1], dtype=torch.float64)
    for i in range(len(deltas)):
        gain = 1.0
        if r is not None:
            shared, unique = int((nz[i] & (count > 1)).sum()), int((nz[i] & (count == 1)).sum())
            gain = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
        out += torch.where(nz[i] & (count == 1), gain * tv[i], 0.0)
        out += torch.where(nz[i] & (count > 1), tv[i] / count.clamp(min=1), 0.0)
    return base.double() + out.view(base.shape)

"""Merge kernels: pure per-tensor functions on (base, task vectors), chunked and fused.

All kernels take the base tensor and resident task vectors ``deltas[i] = theta_i - base`` (never modified),
compute in float32 chunk by chunk (``sparsify.CHUNK`` elements) so a merge holds about one chunk of
temporaries per model (plus, for random/DELLA masks, one bool per element per model), and write the result in
``out``'s dtype (``out`` may alias ``base`` or be a live bf16 parameter).

Registry adapters (``gta_kernel``, ``linear_kernel``, ...) share the calling convention
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

Tensor = torch.Tensor
_RESCALE = {0: None, 1: "l1", 2: "inverse_density", "none": None, "l1": "l1",
            "inverse_density": "inverse_density", None: None}


def check_finite(name: str, tensor: Tensor, model: str) -> None:
    """Raise ValueError naming ``model`` and tensor ``name`` if ``tensor`` holds NaN or inf."""
    flat = tensor.reshape(-1)
    for start, stop in sp.chunks(flat.numel()):
        bad = int(torch.count_nonzero(~torch.isfinite(flat[start:stop])))
        if bad:
            raise ValueError(f"tensor {name!r} of model {model!r} has non-finite values (NaN/inf), "
                             f"first bad chunk at element {start}: {bad} values")


def _check_inputs(base: Tensor, deltas: Sequence[Tensor], n_params: Sequence[Sequence[float]], name: str):
    for i, d in enumerate(deltas):
        if d.shape != base.shape:
            raise ValueError(f"tensor {name or '<unnamed>'!r}: task vector {i} has shape {tuple(d.shape)}, "
                             f"base has {tuple(base.shape)}")
        if d.device != base.device:
            raise ValueError(f"tensor {name or '<unnamed>'!r}: task vector {i} is on {d.device}, base on {base.device}")
    for values in n_params:
        if values is not None and len(values) != len(deltas):
            raise ValueError(f"tensor {name or '<unnamed>'!r}: {len(values)} per-model values for {len(deltas)} models")


def _flat_out(base: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor]:
    """(result tensor, flat view to write) — a contiguous scratch copy if ``out`` is not contiguous."""
    target = torch.empty_like(base) if out is None else out
    if target.shape != base.shape:
        raise ValueError(f"out has shape {tuple(target.shape)}, expected {tuple(base.shape)}")
    flat = target.view(-1) if target.is_contiguous() else torch.empty(base.numel(), dtype=target.dtype,
                                                                          device=base.device)
    return target, flat


def _finish(target: Tensor, flat: Tensor) -> Tensor:
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
    target, flat_out = _flat_out(base, out)
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
    return _finish(target, flat_out)


def add_(acc: Tensor, d: Tensor, alpha: float, scratch: Tensor) -> Tensor:
    """``acc += alpha * d`` in float32; a low-precision ``d`` is converted first (a mixed-dtype add_ is ~4x
    slower on CPU than convert + add)."""
    if d.dtype != acc.dtype:
        d = scratch[: d.numel()].copy_(d)
    return acc.add_(d, alpha=alpha)


def linear_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """Linear (model soup): ``sum(w_i theta_i) / sum(w_i)`` with ``theta_i = base + delta_i``.

    With ``normalize`` 0 it is ``sum(w_i theta_i)``. A weight sum <= 1e-8 with normalisation is a ValueError
    (mergekit would divide by it).
    """
    w = [float(x) for x in model_params["weight"]]
    _check_inputs(base, deltas, [w], name)
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
    _check_inputs(base, deltas, [], name)
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
    _check_inputs(base, deltas, [], name)
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
    target, flat_out = _flat_out(base, out)
    rows_b, rows_o = base.reshape(-1, width), flat_out.view(-1, width)
    rows_d = [d.reshape(-1, width) for d in deltas]
    for r0, r1 in sp.chunks(rows_b.shape[0], max(1, sp.CHUNK // width)):
        m = torch.stack([d[r0:r1].float() for d in rows_d], dim=1)  # (rows, N, width)
        t = model_stock_ratio(m @ m.transpose(1, 2), n)  # (rows,)
        rows_o[r0:r1] = rows_b[r0:r1].float() + m.sum(1).mul_((t / n).unsqueeze(-1))
    return _finish(target, flat_out)



# --- generalized task arithmetic ------------------------------------------------------------------------------
class _Term:
    """One model's contribution: flat task vector, optional mask (rank window, stored bool mask or float
    gain), and its coefficient. Masks are applied with float ops: bool ops are several times slower on CPU."""

    def __init__(self, delta: Tensor, coef: float, window=None, mask: Tensor | None = None):
        self.flat, self.coef, self.window, self.mask = delta.reshape(-1), coef, window, mask
        self.masked = window is not None or mask is not None

    def load(self, start: int, stop: int, w: Tensor, scratch: Tensor) -> Tensor:
        """Write the masked, unscaled float32 chunk into ``w``; ``scratch`` is (2, >= len) float32."""
        return self._mask_(w.copy_(self.flat[start:stop]), start, scratch)

    def _mask_(self, w: Tensor, start: int, scratch: Tensor) -> Tensor:
        if self.window is not None:
            self.window.apply(w, start, scratch)
        elif self.mask is not None:
            m = self.mask[start: start + w.numel()]
            if m.dtype == torch.bool:
                m = scratch[0, : w.numel()].copy_(m.view(torch.uint8))
            w.mul_(m)
        return w

    def l1_ratio(self) -> float:
        """||delta||_1 / ||masked delta||_1 (1 when either is < 1e-7, as mergekit)."""
        before = after = 0.0
        size = min(sp.CHUNK, self.flat.numel())
        w, scratch = torch.empty(size, device=self.flat.device), torch.empty(2, size, device=self.flat.device)
        for start, stop in sp.chunks(self.flat.numel()):
            a = w[: stop - start].copy_(self.flat[start:stop]).abs_()  # masks only look at |delta|
            before += float(a.sum())
            after += float(self._mask_(a, start, scratch).sum())
        return 1.0 if before < 1e-7 or after < 1e-7 else before / after


def _term(delta: Tensor, weight: float, sparsify: str | None, density: float, gamma: float, epsilon: float,
          rescale: str | None, generator: torch.Generator | None) -> _Term | None:
    """Build one model's term (None if it contributes nothing)."""
    if weight == 0 or density <= 0:
        return None
    if sparsify is None or density >= 1:  # mergekit: density >= 1 means no sparsification at all
        return _Term(delta, weight)
    n = delta.numel()
    if sparsify == "magnitude":
        term = _Term(delta, weight, window=sp.WindowMask(delta, n - sp.keep_count(density, n), n))
    elif sparsify == "breadcrumbs":
        term = _Term(delta, weight, window=sp.WindowMask(delta, *sp.breadcrumbs_window(n, density, gamma)))
    elif sparsify in ("random", "della"):
        if generator is None:
            raise ValueError(f"sparsify={sparsify!r} needs a torch.Generator (see sparsify.seed_for)")
        gain = sparsify == "della" and rescale == "inverse_density"
        mask = (sp.random_mask(delta, density, generator) if sparsify == "random"
                else sp.della_mask(delta, density, epsilon, generator, gain=gain))
        term = _Term(delta, weight, mask=mask.reshape(-1))
        if gain:
            return term
    else:
        raise ValueError(f"unknown sparsify method {sparsify!r}")
    if rescale == "l1":
        term.coef *= term.l1_ratio()
    elif rescale == "inverse_density":
        term.coef /= density
    return term


def task_arithmetic(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], *,
                    sparsify: str | None = None, consensus: str | None = None, normalize: bool = False,
                    lambda_: float = 1.0, densities: Sequence[float] | None = None,
                    gammas: Sequence[float] | None = None, epsilon: float = 0.1, rescale: str | None = None,
                    generator: torch.Generator | None = None, out: Tensor | None = None, name: str = "") -> Tensor:
    """Generalized task arithmetic: sparsify each delta, scale by its weight, optional sign consensus,
    optional normalisation, times lambda, added to base. TIES/DARE/breadcrumbs/DELLA are presets of this.

    Args:
        base: base tensor.
        deltas: task vectors (same shape as base).
        weights: one weight per task vector. Negative weights are allowed without normalisation only.
        sparsify: None, "magnitude" (TIES), "random" (DARE), "breadcrumbs", "della".
        consensus: None, "sum" (majority sign of sum w_i delta_i, tie = +) or "count" (of signs).
        normalize: divide by sum w_i (|sum| < 1e-8 -> 1), or with consensus by the agreeing weights (0 -> 1).
        lambda_: final scale of the merged delta.
        densities, gammas, epsilon: sparsification parameters (per model / per model / one).
        rescale: None, "l1" (match the kept delta's L1 norm to the original, mergekit) or "inverse_density"
            (divide by the keep probability, the papers; per element for DELLA).
        generator: random source for "random"/"della".
        out: optional destination.
        name: tensor name for error messages.
    """
    w = [float(x) for x in weights]
    n = len(deltas)
    _check_inputs(base, deltas, [w, densities, gammas], name)
    if normalize and any(x < 0 for x in w):
        raise ValueError(f"tensor {name or '<unnamed>'!r}: normalize=True with negative weights {w} is undefined; "
                         "use normalize=False for task negation")
    dens = list(densities) if densities is not None else [1.0] * n
    gams = list(gammas) if gammas is not None else [0.0] * n
    terms = [_term(d, w[i], sparsify, dens[i], gams[i], epsilon, rescale, generator) for i, d in enumerate(deltas)]
    if consensus is None:
        total = sum(w)
        div = total if normalize and abs(total) >= 1e-8 else 1.0
        live = [t for t in terms if t is not None]
        for t in live:
            t.coef *= lambda_ / div
        if all(t.window is None and t.mask is None for t in live):
            return weighted_sum(base, 1.0, [t.flat for t in live], [t.coef for t in live], out)
    kept = [(t, w[i]) for i, t in enumerate(terms) if t is not None]
    return _merge_chunks(base, kept, consensus, normalize, lambda_, out)


def _merge_chunks(base: Tensor, kept: list[tuple[_Term, float]], consensus: str | None, normalize: bool,
                  lambda_: float, out: Tensor | None) -> Tensor:
    target, flat_out = _flat_out(base, out)
    fb, n = base.reshape(-1), len(kept)
    size = min(sp.CHUNK, fb.numel())
    W = torch.empty(max(n, 1), size, device=base.device)  # one float32 chunk per model
    scratch = torch.empty(4, size, device=base.device)
    direct = flat_out.dtype == torch.float32
    acc_buf = None if direct else torch.empty(size, device=base.device)
    for start, stop in sp.chunks(fb.numel()):
        c = stop - start
        acc = flat_out[start:stop] if direct else acc_buf[:c]
        acc.copy_(fb[start:stop])
        if consensus is None:
            for i, (t, _) in enumerate(kept):
                d = t.load(start, stop, W[i, :c], scratch[:, :c]) if t.masked else t.flat[start:stop]
                add_(acc, d, t.coef, W[i])
        elif n:
            mixed = _consensus_chunk(kept, W[:, :c], scratch[:, :c], start, stop, consensus, normalize)
            acc.add_(mixed, alpha=lambda_)
        if not direct:
            flat_out[start:stop].copy_(acc)
    return _finish(target, flat_out)


def _consensus_chunk(kept, W: Tensor, scratch: Tensor, start: int, stop: int, consensus: str,
                     normalize: bool) -> Tensor:
    """Sign-consensus mix of one chunk. W (N, c) and scratch (4, c) are float32 work space; the result lives
    in scratch[0]."""
    for i, (t, _) in enumerate(kept):
        t.load(start, stop, W[i], scratch[:2]).mul_(t.coef)
    sg, tmp = scratch[2], scratch[3]
    if consensus == "sum":
        sg.copy_(W[0])
        for i in range(1, len(kept)):
            sg.add_(W[i])
    elif consensus == "count":
        torch.sign(W[0], out=sg)
        for i in range(1, len(kept)):
            sg.add_(torch.sign(W[i], out=tmp))
    else:
        raise ValueError(f"unknown consensus method {consensus!r}")
    sg.sign_().add_(0.5).sign_()  # majority sign in {-1, +1}; a tie (0) counts as +
    W.mul_(sg).clamp_(min=0)  # agreeing entries stay (now positive); zeros never agree
    mixed = scratch[0].copy_(W[0])
    for i in range(1, len(kept)):
        mixed.add_(W[i])
    if normalize:
        div = scratch[1].zero_()
        for i, (_, w) in enumerate(kept):
            div.add_(torch.sign(W[i], out=tmp), alpha=w)
        # weights are >= 0 here, so div == 0 only where no model agrees and mixed is 0 (mergekit: divisor 1)
        mixed.div_(div.clamp_(min=1e-30))
    return mixed.mul_(sg)


def gta_kernel(base, deltas, model_params, global_params, *, sparsify=None, consensus=None, generator=None,
               out=None, name=""):
    """Registry adapter for the task-arithmetic presets (the preset fixes sparsify and consensus)."""
    g = global_params
    return task_arithmetic(
        base, deltas, model_params["weight"], sparsify=sparsify, consensus=consensus,
        normalize=bool(g.get("normalize", 0.0)), lambda_=float(g.get("lambda", 1.0)),
        densities=model_params.get("density"), gammas=model_params.get("gamma"),
        epsilon=float(g.get("epsilon", 0.1)), rescale=_rescale_mode(g.get("rescale", 0.0)),
        generator=generator, out=out, name=name)


def _rescale_mode(value) -> str | None:
    key = value if isinstance(value, str) or value is None else int(round(float(value)))
    if isinstance(value, bool):
        key = int(value)
    if key not in _RESCALE:
        raise ValueError(f"rescale must be 0/none, 1/l1 or 2/inverse_density, got {value!r}")
    return _RESCALE[key]

"""Generalized task arithmetic: sparsify each task vector, scale, optional sign consensus and normalisation,
times lambda, added to the base. TIES, DARE, breadcrumbs and DELLA are registry presets of ``task_arithmetic``.

Deliberate differences from mergekit are listed in ``optimizer.merge.kernels`` and ``optimizer.merge.sparsify``.

Example:
    >>> import torch
    >>> base, d = torch.zeros(4), torch.ones(4)
    >>> task_arithmetic(base, [d, -d], [1.0, 0.5]).tolist()
    [0.5, 0.5, 0.5, 0.5]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from optimizer.merge import fused
from optimizer.merge import sparsify as sp
from optimizer.merge.tensor_ops import (
    add_,
    check_inputs,
    finish,
    finish_out,
    out_buffer,
    precision,
    weighted_sum,
)

Tensor = torch.Tensor
_RESCALE = {0: None, 1: "l1", 2: "inverse_density", "none": None, "l1": "l1",
            "inverse_density": "inverse_density", None: None}


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
                    generator: torch.Generator | None = None, out: Tensor | None = None, name: str = "",
                    storage: bool = False) -> Tensor:
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
        storage: compute in the tensors' dtype op by op as mergekit (``precision: storage``) instead of float32.
    """
    w = [float(x) for x in weights]
    n = len(deltas)
    check_inputs(base, deltas, [w, densities, gammas], name)
    if normalize and any(x < 0 for x in w):
        raise ValueError(f"tensor {name or '<unnamed>'!r}: normalize=True with negative weights {w} is undefined; "
                         "use normalize=False for task negation")
    dens = list(densities) if densities is not None else [1.0] * n
    gams = list(gammas) if gammas is not None else [0.0] * n
    if storage:
        masked = [_storage_term(d, sparsify, dens[i], gams[i], epsilon, rescale, generator)
                  for i, d in enumerate(deltas)]
        return finish(_storage_mix(base, masked, w, consensus, normalize, lambda_), base, out)
    terms = [_term(d, w[i], sparsify, dens[i], gams[i], epsilon, rescale, generator) for i, d in enumerate(deltas)]
    if consensus is None:
        total = sum(w)
        div = total if normalize and abs(total) >= 1e-8 else 1.0
        live = [t for t in terms if t is not None]
        for t in live:
            t.coef *= lambda_ / div
        if all(t.window is None and t.mask is None for t in live):
            return weighted_sum(base, 1.0, [t.flat for t in live], [t.coef for t in live], out)
    if all(t is None or t.mask is None for t in terms):
        # every model passed (a dropped one with an empty window): one compiled variant per model count
        target, flat_out = out_buffer(base, out)
        if fused.window_mix(base.reshape(-1), [d.reshape(-1) for d in deltas],
                            [sp.EMPTY_WINDOW if t is None else t.window for t in terms],
                            [0.0 if t is None else t.coef for t in terms], w, consensus, normalize, lambda_,
                            flat_out):
            return finish_out(target, flat_out)
    kept = [(t, w[i]) for i, t in enumerate(terms) if t is not None]
    return _merge_chunks(base, kept, consensus, normalize, lambda_, out)


def _merge_chunks(base: Tensor, kept: list[tuple[_Term, float]], consensus: str | None, normalize: bool,
                  lambda_: float, out: Tensor | None) -> Tensor:
    target, flat_out = out_buffer(base, out)
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
    return finish_out(target, flat_out)


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
        generator=generator, out=out, name=name, storage=precision(g) == "storage")


def _rescale_mode(value) -> str | None:
    key = value if isinstance(value, str) or value is None else int(round(float(value)))
    if isinstance(value, bool):
        key = int(value)
    if key not in _RESCALE:
        raise ValueError(f"rescale must be 0/none, 1/l1 or 2/inverse_density, got {value!r}")
    return _RESCALE[key]


# --- precision: storage (mergekit's arithmetic in the tensors' own dtype) --------------------------------------
def _storage_term(delta: Tensor, sparsify: str | None, density: float, gamma: float, epsilon: float,
                  rescale: str | None, generator: torch.Generator | None) -> Tensor:
    """One model's sparsified task vector in its dtype, as mergekit's ``sparsify`` (its argsort tie order;
    the random masks are this module's, drawn in the same order as the float32 path)."""
    if sparsify is None or density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    n, flat = delta.numel(), delta.reshape(-1)
    gain = None
    if sparsify == "magnitude":
        mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
        mask[torch.argsort(flat.abs().float(), descending=True)[: max(1, int(density * n))]] = 1
    elif sparsify == "breadcrumbs":
        target, n_top = int(density * n), int(gamma * n)
        lo = max(0, n - target - n_top)
        mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
        mask[torch.sort(flat.abs().float()).indices[lo: lo + target]] = 1
    elif generator is None:
        raise ValueError(f"sparsify={sparsify!r} needs a torch.Generator (see sparsify.seed_for)")
    elif sparsify == "random":
        mask = sp.random_mask(delta, density, generator).reshape(-1).to(delta.dtype)
    else:
        g = sp.della_mask(delta, density, epsilon, generator, gain=rescale == "inverse_density").reshape(-1)
        mask, gain = (g != 0).to(delta.dtype), (g.to(delta.dtype) if rescale == "inverse_density" else None)
    masked = flat * mask
    if gain is not None:
        masked = flat * gain
    elif rescale == "l1":
        before, after = flat.abs().sum(), masked.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            masked = masked * (before / after)
    elif rescale == "inverse_density":
        masked = masked / density
    return masked.view(delta.shape)


def _storage_mix(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], consensus: str | None,
                 normalize: bool, lambda_: float) -> Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge combination, op by op in the base's dtype."""
    if not deltas:
        return base
    d = torch.stack([x.to(base.dtype) for x in deltas])
    w = torch.tensor(weights, dtype=d.dtype, device=d.device).view(-1, *[1] * base.dim())
    d = d * w
    if consensus is not None:
        sign = d.sign()
        key = d.sum(dim=0) if consensus == "sum" else sign.sum(dim=0)
        agree = sign == ((key >= 0).to(d.dtype) * 2 - 1)
        mixed, divisor = (d * agree).sum(dim=0), (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = d.sum(dim=0), w.sum(dim=0).expand_as(base).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed

"""Task-vector sparsification masks (magnitude, random, breadcrumbs, DELLA) as pure functions.

Everything works on flattened tensors in chunks of ``CHUNK`` elements so that a mask never needs more than a
chunk of float temporaries. Deliberate differences from mergekit's ``sparsify.py``:

- Order statistics are exact but never use a full argsort/topk (an int64 index per element): bf16/fp16
  tensors use a memoised 2**15-bin histogram of |x| bit patterns, float32 ones a sample-bracketed streaming
  pass. Ties at the threshold are broken by position (mergekit: argsort order, i.e. arbitrary).
- Random/DELLA masks are stored as one bool per element per model (DELLA with per-element inverse-probability
  rescale: a float32 gain) so that L1 rescaling needs no second RNG pass.
- A positive density keeps at least one element (mergekit asserts ``int(density * numel) > 0``); density 0
  keeps nothing.
- Breadcrumbs with ``int(gamma * numel) == 0`` drops no large entries (mergekit's ``indices[n_bot:-0]`` is
  empty, so it silently zeroes the whole delta).
- Random keep decisions compare 16-bit uniforms with the keep probability, so it is quantised to 2**-16
  (mergekit: float bernoulli); this halves the RNG cost on CPU.
- DELLA keep probabilities are clamped to [0, 1] instead of raising when density ± epsilon leaves (0, 1).
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from optimizer.merge import fused

CHUNK = 1 << 18  # elements per chunk: the few float32 buffers of this size a merge needs stay in cache
_SAMPLE = 1 << 16  # sample size used to bracket an order statistic
_EXACT_BELOW = 1 << 18  # below this many elements, select exactly with kthvalue


def seed_for(study_seed: int, trial: int, tensor_name: str) -> int:
    """A 63-bit seed for one tensor of one trial, stable across processes and platforms.

    Args:
        study_seed: the study's seed.
        trial: trial number.
        tensor_name: parameter name, e.g. "model.layers.0.mlp.up_proj.weight".
    """
    digest = hashlib.sha256(f"{study_seed}:{trial}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def chunks(n: int, size: int | None = None) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(n), ``size`` (default CHUNK) at a time."""
    size = size or CHUNK
    for start in range(0, n, size):
        yield start, min(n, start + size)


def keep_count(density: float, n: int) -> int:
    """Elements a magnitude mask keeps: ``int(density * n)`` as mergekit, but >= 1 for a positive density."""
    if density <= 0:
        return 0
    if density >= 1:
        return n
    return max(1, int(density * n))


def breadcrumbs_window(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Ascending-magnitude rank window [lo, hi) breadcrumbs keeps: drop the top ``int(gamma*n)``, then the
    bottom until ``keep_count(density, n)`` remain (mergekit's order: fewer top drops if both don't fit)."""
    target = keep_count(density, n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    return n_bot, n - n_top


@dataclass(frozen=True)
class OrderStat:
    """The rank-th smallest |x| (0-based), and how many elements are smaller / equal."""

    value: float
    n_less: int
    n_equal: int


def _exact_stat(a: torch.Tensor, rank: int) -> OrderStat:
    v = torch.kthvalue(a, rank + 1).values
    return OrderStat(v.item(), int(torch.count_nonzero(a < v)), int(torch.count_nonzero(a == v)))


def _abs32(x: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
    """|x| in float32 (masks are decided on the float32 values the kernels compute with)."""
    if buf is None:
        return x.float().abs() if x.dtype != torch.float32 else x.abs()
    return buf[: x.numel()].copy_(x).abs_()


_HIST_CACHE: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def magnitude_histogram(x: torch.Tensor) -> torch.Tensor | None:
    """Cumulative counts of |x| per 16-bit pattern for bf16/fp16 tensors (None for other dtypes).

    For 16-bit floats the bit pattern of |x| orders like its value, so this gives exact order statistics with
    no further pass. Memoised per tensor object and version (resident task vectors are ranked once per study,
    not once per trial); the entry is dropped when the tensor is freed.
    """
    if x.dtype not in (torch.bfloat16, torch.float16):
        return None
    hit = _HIST_CACHE.get(id(x))
    if hit is not None and hit[0]() is x and hit[1] == x._version:
        return hit[2]
    flat = x.reshape(-1)
    counts = torch.zeros(1 << 15, dtype=torch.int64, device=x.device)
    for start, stop in chunks(flat.numel()):
        counts += torch.bincount(flat[start:stop].view(torch.int16).bitwise_and(0x7FFF).long(), minlength=1 << 15)
    cum = counts.cumsum(0).cpu()
    key = id(x)
    _HIST_CACHE[key] = (weakref.ref(x, lambda _, k=key: _HIST_CACHE.pop(k, None)), x._version, cum)
    return cum


def _histogram_stat(cum: torch.Tensor, rank: int, dtype: torch.dtype) -> OrderStat:
    b = int(torch.searchsorted(cum, rank, right=True))
    n_less = int(cum[b - 1]) if b else 0
    value = torch.tensor([b], dtype=torch.int16).view(dtype).item()
    return OrderStat(value, n_less, int(cum[b]) - n_less)


def order_stats(x: torch.Tensor, ranks: Sequence[int]) -> list[OrderStat]:
    """Exact ascending order statistics of ``|x|`` (float32) with a chunk of temporaries (plus ~1% of x).

    A strided sample brackets each rank; one streaming pass counts elements below the bracket and gathers those
    inside it; kthvalue runs on the gathered candidates only. Falls back to a full kthvalue if a bracket missed.

    Args:
        x: any tensor (flattened).
        ranks: 0-based ranks in [0, numel).
    """
    cum = magnitude_histogram(x)
    if cum is not None:
        return [_histogram_stat(cum, r, x.dtype) for r in ranks]
    flat = x.reshape(-1)
    n = flat.numel()
    if n <= _EXACT_BELOW:
        a = _abs32(flat)
        return [_exact_stat(a, r) for r in ranks]
    sample = _abs32(flat[:: n // _SAMPLE]).sort().values
    m = sample.numel()
    bounds = []
    for r in ranks:
        q = r / n
        half = 4 * math.sqrt(m * q * (1 - q)) + 0.002 * m + 16  # ~4 sigma plus slack for structured data
        i0, i1 = math.floor(q * m - half), math.ceil(q * m + half)
        bounds.append((sample[i0].item() if i0 > 0 else -1.0, sample[i1].item() if i1 < m else math.inf))
    below = [0] * len(ranks)
    cands: list[list[torch.Tensor]] = [[] for _ in ranks]
    bufs = torch.empty(3, min(CHUNK, n), device=x.device)
    for start, stop in chunks(n):
        a = _abs32(flat[start:stop], bufs[0])
        ge, le = bufs[1, : stop - start], bufs[2, : stop - start]
        for j, (lo, hi) in enumerate(bounds):  # float compares: much faster than bool ones on CPU
            torch.ge(a, lo, out=ge)
            below[j] += (stop - start) - int(ge.sum())
            cands[j].append(a[ge.mul_(torch.le(a, hi, out=le)).bool()])
    stats = []
    for r, b, c in zip(ranks, below, cands, strict=True):
        cand = torch.cat(c)
        if b <= r < b + cand.numel():
            s = _exact_stat(cand, r - b)
            stats.append(OrderStat(s.value, b + s.n_less, s.n_equal))
        else:  # bracket missed (adversarial layout): exact but one tensor's worth of memory
            stats.append(_exact_stat(_abs32(flat), r))
    return stats


def tie_position(x: torch.Tensor, value: float, j: int) -> int:
    """Flat index of the j-th (0-based) element whose float32 |x| equals ``value``."""
    pos = fused.tie_position(x, value, j)
    if pos is not None:
        return pos
    flat, seen = x.reshape(-1), 0
    bufs = torch.empty(2, min(CHUNK, flat.numel()), device=x.device)
    for start, stop in chunks(flat.numel()):
        eq = torch.eq(_abs32(flat[start:stop], bufs[0]), value, out=bufs[1, : stop - start])
        count = int(eq.sum())  # float compare + sum: several times faster than bool ops on CPU
        if seen + count > j:
            return start + int(eq.nonzero()[j - seen])
        seen += count
    raise ValueError(f"fewer than {j + 1} elements equal {value}")


class WindowMask:
    """Keeps the elements whose stable ascending-|x| rank lies in [lo, hi) (ties broken by position).

    Resolved once into magnitude thresholds plus the flat positions where elements tied at a threshold switch
    from dropped to kept (lower bound) or from kept to dropped (upper bound); chunks are then masked in any
    order with float compares only.

    Args:
        x: the tensor whose magnitudes are ranked.
        lo, hi: rank window, 0 <= lo <= hi <= numel.
    """

    def __init__(self, x: torch.Tensor, lo: int, hi: int):
        n = x.numel()
        self.empty, self.full = lo >= hi, lo <= 0 and hi >= n
        self.lo = self.hi = None
        self.cut_lo, self.cut_hi = 0, n  # before cut_lo: > lo (ties dropped); from cut_hi on: < hi
        if self.empty or self.full:
            return
        stats = order_stats(x, ([lo] if lo > 0 else []) + ([hi - 1] if hi < n else []))
        if lo > 0:
            s = stats[0]
            self.lo = s.value
            if lo > s.n_less:
                self.cut_lo = tie_position(x, s.value, lo - s.n_less)
        if hi < n:
            s = stats[-1]
            self.hi = s.value
            if hi - s.n_less < s.n_equal:
                self.cut_hi = tie_position(x, s.value, hi - s.n_less)

    def apply(self, w: torch.Tensor, start: int, scratch: torch.Tensor, target: torch.Tensor | None = None):
        """Zero in place the entries of ``target`` (default ``w``) whose x lies outside the window.

        Args:
            w: float32 values of x[start:start+len(w)].
            start: flat offset of the chunk in x.
            scratch: float32 buffer of shape (2, >= len(w)).
            target: float32 tensor like ``w`` to mask instead of ``w``.
        """
        target = w if target is None else target
        if self.full or self.empty:
            return target if self.full else target.zero_()
        stop = start + w.numel()
        cuts = sorted({start, stop} | {c for c in (self.cut_lo, self.cut_hi) if start < c < stop})
        for s0, s1 in zip(cuts, cuts[1:], strict=False):
            seg = slice(s0 - start, s1 - start)
            self._segment(w[seg], target[seg], scratch[:, : s1 - s0], s0 < self.cut_lo, s0 >= self.cut_hi)
        return target

    def _segment(self, w, target, scratch, strict_lo: bool, strict_hi: bool) -> None:
        a, keep = scratch[0], scratch[1]
        torch.abs(w, out=a)
        if self.lo is not None:
            (torch.gt if strict_lo else torch.ge)(a, self.lo, out=keep)
        if self.hi is not None:
            (torch.lt if strict_hi else torch.le)(a, self.hi, out=a)
            if self.lo is not None:
                keep.mul_(a)
            else:
                keep = a
        target.mul_(keep)


def window_mask(delta: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Full bool mask (shape of delta) of the rank window [lo, hi) of |delta|."""
    wm, flat = WindowMask(delta, lo, hi), delta.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.bool, device=delta.device)
    scratch = torch.empty(4, min(CHUNK, flat.numel()), device=delta.device)
    for start, stop in chunks(flat.numel()):
        ones = scratch[0, : stop - start].fill_(1.0)
        wm.apply(_abs32(flat[start:stop], scratch[1]), start, scratch[2:], target=ones)
        out[start:stop] = ones != 0
    return out.view(delta.shape)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``keep_count(density, numel)`` largest |delta| (TIES)."""
    n = delta.numel()
    return window_mask(delta, n - keep_count(density, n), n)


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the top ``gamma`` and the smallest entries so that ``density`` remains (Model Breadcrumbs)."""
    if density >= 1:  # as mergekit: density 1 disables the outlier cut too
        return torch.ones_like(delta, dtype=torch.bool)
    return window_mask(delta, *breadcrumbs_window(delta.numel(), density, gamma))


def uniform16(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n uniform int16 values (four per 64-bit draw), generated on the generator's device."""
    raw = torch.empty((n + 3) // 4, dtype=torch.int64, device=generator.device)
    raw.random_(-(2**63), 2**63 - 1, generator=generator)
    return raw.view(torch.int16)[:n].to(device, non_blocking=True)


def _threshold16(p: torch.Tensor | float):
    # P(u < p * 65536 - 32768) = p for u uniform on the int16 range (quantised to 2**-16)
    return p * 65536.0 - 32768.0


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(density) keep mask (DARE), drawn chunk by chunk from ``generator``."""
    flat = delta.reshape(-1)
    if density >= 1 or density <= 0:
        return torch.full(delta.shape, density >= 1, dtype=torch.bool, device=delta.device)
    thr = min(32767, round(_threshold16(density)))
    out = torch.empty(flat.shape, dtype=torch.bool, device=delta.device)
    for start, stop in chunks(flat.numel()):
        torch.lt(uniform16(stop - start, generator, delta.device), thr, out=out[start:stop])
    return out.view(delta.shape)


def della_rows(delta: torch.Tensor) -> torch.Tensor:
    """DELLA ranks magnitudes within rows: dim 0 for matrices, the whole vector for 1-D tensors."""
    return delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)


def della_keep_prob(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-element keep probability (density - eps) + 2 eps * rank/(L-1), ranking |rows| per row (ties by
    position), clamped to [0, 1]. A row of length 1 gets ``density``."""
    a = rows.abs().float()
    length = a.shape[1]
    order = torch.argsort(a, dim=1, stable=True)
    ranks = torch.empty_like(a)
    ranks.scatter_(1, order, torch.arange(length, device=a.device, dtype=a.dtype).expand_as(a))
    rank_norm = ranks.div_(length - 1) if length > 1 else ranks.fill_(0.5)
    return rank_norm.mul_(2 * epsilon).add_(density - epsilon).clamp_(0, 1)


def della_mask(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
               *, gain: bool = False) -> torch.Tensor:
    """DELLA (MagPrune) keep mask, or with ``gain=True`` a float32 multiplier 1/p on kept elements, 0 else.

    Args:
        delta: task vector.
        density: mean keep probability.
        epsilon: half-width of the keep probabilities across magnitude ranks.
        generator: random source.
        gain: return the inverse-probability multiplier (the paper's rescale) instead of a bool mask.
    """
    rows = della_rows(delta)
    out = torch.empty(rows.shape, dtype=torch.float32 if gain else torch.bool, device=delta.device)
    step = max(1, CHUNK // max(1, rows.shape[1]))
    for r0, r1 in chunks(rows.shape[0], step):
        p = della_keep_prob(rows[r0:r1], density, epsilon)
        keep = uniform16(p.numel(), generator, delta.device).view(p.shape) < _threshold16(p)
        if gain:
            out[r0:r1] = p.reciprocal_().mul_(keep)
        else:
            out[r0:r1] = keep
    return out.view(delta.shape)


EMPTY_WINDOW = WindowMask(torch.zeros(1), 1, 1)  # keeps nothing (a model that contributes nothing)

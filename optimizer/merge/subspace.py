"""Data-free subspace merges mergekit lacks: TSV-M, Iso-C, Iso-CTS (isotropic spectrum) and WUDI.

Each has a trial-independent part (SVDs of the task matrices, WUDI's per-layer least-squares solve) computed
once per set of resident task vectors and memoised (``tensor_ops.memoised``: a study pays it on its first
trial, later trials reuse it), and a cheap trial part: a weighted sum with the searched coefficients, the
speed of task arithmetic. The per-tensor rule of the papers applies to 2-D weight matrices; other tensors
(norms, biases) and the vocabulary matrices (embed_tokens, lm_head: as the papers' LLM ports, whose SVD would
dominate the cost) take the mean task vector.

- TSV-M (Gargiulo et al., CVPR 2025, arXiv:2412.00081): per task, the top r/T singular triplets of its task
  matrix (r = min(out, in), T tasks); the concatenated left and right singular vectors are orthogonalised
  (polar factor, by SVD) and recombined with each task's singular values. Component i is task i's share of
  that sum, so ``weight`` per model and unit scales it (paper: all weights alpha = 1).
- Iso-C (Marczak et al., ICML 2025, arXiv:2502.04959): the sum of the task matrices with all its singular
  values replaced by their mean; ``alpha`` per unit scales it.
- Iso-CTS (same paper): the top singular vectors of the sum (``common_fraction`` of the rank, rounded so the
  rest divides by T) plus, per task, the top directions of its matrix outside that common subspace; all
  orthogonalised, with the mean singular value; ``alpha`` per unit.
- WUDI (Cheng et al., ICML 2025, arXiv:2503.08099): the merged task matrix minimising
  sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2. The paper takes 300 Adam steps from sum_i tau_i; we
  solve the normal equations tau G = B (G = sum_i c_i tau_i^T tau_i, B = sum_i c_i tau_i tau_i^T tau_i) exactly,
  keeping the initialisation's component in G's null space: the point gradient descent converges to.
  ``alpha`` per unit scales it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from optimizer.merge.tensor_ops import check_inputs, memoised, weighted_sum
from optimizer.models import is_vocab_tensor

Tensor = torch.Tensor


def is_matrix(t: Tensor, name: str) -> bool:
    """Whether the papers' matrix rule applies (2-D, not a vocabulary tensor)."""
    return t.dim() == 2 and not is_vocab_tensor(name)


def _f(deltas: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> list[Tensor]:
    return [d.to(dtype) for d in deltas]


def svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD in the input's dtype; LAPACK's divide-and-conquer can fail to converge on ill-conditioned
    float32 inputs (e.g. Iso-CTS's overlapping task subspaces), so a failure is retried in float64."""
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def polar(a: Tensor) -> Tensor:
    """The orthogonal polar factor P Q^T of a = P S Q^T (the closest matrix with orthonormal columns/rows)."""
    p, _, qh = svd(a)
    return p @ qh


def tsv_components(deltas: Sequence[Tensor], name: str) -> list[Tensor]:
    """TSV-M per-task components M_i (sum_i M_i is the paper's merged task matrix), in the deltas' dtype."""
    n, dtype = len(deltas), deltas[0].dtype
    r = min(deltas[0].shape) if deltas[0].dim() == 2 else 0
    k = r // n
    if not is_matrix(deltas[0], name) or k == 0:
        return [(d.float() / n).to(dtype) for d in deltas]
    us, ss, vs = [], [], []
    for d in _f(deltas):
        u, s, vh = svd(d)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k])
    u_orth, v_orth = polar(torch.cat(us, dim=1)), polar(torch.cat(vs, dim=0))
    return [((u_orth[:, i * k:(i + 1) * k] * ss[i]) @ v_orth[i * k:(i + 1) * k]).to(dtype) for i in range(n)]


def iso_c_delta(deltas: Sequence[Tensor], name: str) -> Tensor:
    """Iso-C merged task matrix: the sum's singular vectors with the mean singular value."""
    total = sum(_f(deltas))
    if not is_matrix(deltas[0], name):
        return (total / len(deltas)).to(deltas[0].dtype)
    u, s, vh = svd(total)
    return (s.mean() * (u @ vh)).to(deltas[0].dtype)


def cts_sizes(r: int, n: int, fraction: float) -> tuple[int, int]:
    """(common subspace size, directions per task) of Iso-CTS for rank r and n tasks."""
    common = int(r * fraction)
    common = r - round((r - common) / n) * n  # the task-specific part divides evenly by n
    return common, (r - common) // n


def iso_cts_delta(deltas: Sequence[Tensor], name: str, fraction: float) -> Tensor:
    """Iso-CTS merged task matrix (common + task-specific subspaces, isotropic spectrum)."""
    fs = _f(deltas)
    total = sum(fs)
    if not is_matrix(deltas[0], name):
        return (total / len(deltas)).to(deltas[0].dtype)
    u, s, vh = svd(total)
    common, per_task = cts_sizes(min(total.shape), len(deltas), fraction)
    uc = u[:, :common]
    us, ss, vs = [uc], [s[:common]], [vh[:common]]
    for d in fs:
        ut, st, vth = svd(d - uc @ (uc.T @ d))
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vth[:per_task])
    sigma = torch.cat(ss).mean()
    return (sigma * (polar(torch.cat(us, dim=1)) @ polar(torch.cat(vs, dim=0)))).to(deltas[0].dtype)


def wudi_delta(deltas: Sequence[Tensor], name: str, rtol: float = 1e-10) -> Tensor:
    """WUDI merged task matrix: the minimiser of the paper's loss nearest to its initialisation sum_i tau_i."""
    if not is_matrix(deltas[0], name):
        return (sum(_f(deltas)) / len(deltas)).to(deltas[0].dtype)
    taus = _f(deltas, torch.float64)
    init = sum(taus)
    g = torch.zeros(taus[0].shape[1], taus[0].shape[1], dtype=torch.float64, device=init.device)
    b = torch.zeros_like(init)
    for t in taus:
        sq = float(t.square().sum())
        if sq == 0.0:
            continue  # a zero task vector has no interference term (its loss term is 0/0)
        gram = t.T @ t
        g += gram / sq
        b += (t @ gram) / sq
    lam, q = torch.linalg.eigh(g)
    keep = lam > rtol * max(float(lam.max()), 0.0)
    qk = q[:, keep]
    solved = ((b @ qk) / lam[keep]) @ qk.T  # B G^+
    return (solved + init - (init @ qk) @ qk.T).to(deltas[0].dtype)


def tsv_m_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """TSV-M: base + sum_i weight_i * M_i (components memoised per set of task vectors)."""
    w = [float(x) for x in model_params["weight"]]
    check_inputs(base, deltas, [w], name)
    comps = memoised(deltas, ("tsv_m", name), lambda: tsv_components(deltas, name))
    return weighted_sum(base, 1.0, comps, w, out)


def _scaled(kind: str, fn, base, deltas, gp, out, name, *extra):
    check_inputs(base, deltas, [], name)
    merged = memoised(deltas, (kind, name, *extra), lambda: fn(deltas, name, *extra))
    return weighted_sum(base, 1.0, [merged], [float(gp["alpha"])], out)


def iso_c_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """Iso-C: base + alpha * merged."""
    return _scaled("iso_c", iso_c_delta, base, deltas, global_params, out, name)


def iso_cts_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """Iso-CTS: base + alpha * merged (``common_fraction`` of the rank in the common subspace)."""
    fraction = float(global_params.get("common_fraction", 0.8))
    return _scaled("iso_cts", iso_cts_delta, base, deltas, global_params, out, name, fraction)


def wudi_kernel(base, deltas, model_params, global_params, *, generator=None, out=None, name=""):
    """WUDI: base + alpha * merged."""
    return _scaled("wudi", wudi_delta, base, deltas, global_params, out, name)

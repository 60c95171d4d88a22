"""The papers' equations for TSV-M, Iso-C, Iso-CTS and WUDI, transcribed directly (float64, small matrices).

Independent of optimizer.merge.subspace: orthogonalisation is written as whitening X (X^T X)^(-1/2) by an
eigendecomposition (the kernels use the SVD polar factor), isotropic scaling as the trace of the spectrum,
and WUDI's merged vector is found by minimising the paper's loss with autograd and L-BFGS from the paper's
initialisation (the kernel solves the normal equations).
"""

from __future__ import annotations

import torch


def whiten(x: torch.Tensor) -> torch.Tensor:
    """X (X^T X)^(-1/2): the orthonormal matrix closest to X (full column rank)."""
    lam, q = torch.linalg.eigh(x.T @ x)
    return x @ (q * lam.rsqrt()) @ q.T


def low_rank(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return u[:, :k], s[:k], vh[:k].T


def tsv_m(deltas: list[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    """TSV-M (Gargiulo et al. 2025, Sec. 4): per task the rank-floor(r/T) truncation U_i S_i V_i^T, U = [U_i],
    V = [V_i] whitened, merged delta = alpha * U_perp blockdiag(S_i) V_perp^T."""
    ds = [d.double() for d in deltas]
    k = min(ds[0].shape) // len(ds)
    parts = [low_rank(d, k) for d in ds]
    u = whiten(torch.cat([p[0] for p in parts], 1))
    v = whiten(torch.cat([p[2] for p in parts], 1))
    return alpha * u @ torch.diag(torch.cat([p[1] for p in parts])) @ v.T


def iso_c(deltas: list[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    """Iso-C (Marczak et al. 2025, Eq. 5): sigma_bar * U V^T of Delta_TA = sum_i Delta_i, sigma_bar the mean
    singular value = trace((Delta^T Delta)^(1/2)) / r; U V^T is Delta's orthogonal polar factor."""
    d = sum(x.double() for x in deltas)
    tall = d.shape[0] >= d.shape[1]
    polar = whiten(d) if tall else whiten(d.T).T
    lam = torch.linalg.eigvalsh(d.T @ d if tall else d @ d.T).clamp(min=0)
    return alpha * lam.sqrt().mean() * polar


def iso_cts(deltas: list[torch.Tensor], fraction: float, alpha: float = 1.0) -> torch.Tensor:
    """Iso-CTS (same paper, Sec. 4.2): the top-k common subspace of Delta_TA, plus per task the top s
    directions of (I - U_c U_c^T) Delta_i, all orthogonalised, with the mean of their singular values."""
    ds = [d.double() for d in deltas]
    r, t = min(ds[0].shape), len(ds)
    k = int(r * fraction)
    k = r - round((r - k) / t) * t
    s = (r - k) // t
    uc, sc, vc = low_rank(sum(ds), k)
    parts = [low_rank(d - uc @ uc.T @ d, s) for d in ds]
    u = whiten(torch.cat([uc, *[p[0] for p in parts]], 1))
    v = whiten(torch.cat([vc, *[p[2] for p in parts]], 1))
    sigma = torch.cat([sc, *[p[1] for p in parts]]).mean()
    return alpha * sigma * u @ v.T


def wudi_loss(tau: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
    """WUDI (Cheng et al. 2025, Eq. 10): sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2."""
    return sum(((tau - ti) @ ti.T).square().sum() / ti.square().sum() for ti in taus)


def wudi(deltas: list[torch.Tensor], steps: int = 200) -> torch.Tensor:
    """The merged task vector: the paper's loss minimised from its initialisation sum_i tau_i."""
    taus = [d.double() for d in deltas]
    tau = torch.nn.Parameter(sum(taus).clone())
    opt = torch.optim.LBFGS([tau], lr=1.0, max_iter=steps, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = wudi_loss(tau, taus)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return tau.detach()

"""TSV-M, Iso-C, Iso-CTS and WUDI against direct transcriptions of their papers' equations on small matrices,
their tensor rules, and the memo that keeps a trial as cheap as task arithmetic."""

from __future__ import annotations

import pytest
import torch

from optimizer.merge import subspace
from optimizer.merge.registry import get_method
from tests.merge import subspace_reference as paper


def tasks(n: int, shape: tuple[int, int], seed: int = 0, rank: int | None = None) -> list[torch.Tensor]:
    """n task matrices with a shared component (tasks interfere) and, optionally, rank-limited ones."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(shape, generator=g, dtype=torch.float64)
    out = []
    for _ in range(n):
        if rank is None:
            t = torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            t = torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ torch.randn(
                rank, shape[1], generator=g, dtype=torch.float64)
        out.append((0.5 * shared + t).float())
    return out


SHAPES = [(12, 9), (9, 12), (16, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3])
def test_tsv_m_is_the_papers_merge(shape, n):
    ds = tasks(n, shape)
    comps = subspace.tsv_components(ds, "w")
    torch.testing.assert_close(sum(c.double() for c in comps), paper.tsv_m(ds), rtol=1e-4, atol=1e-4)
    # the paper's alpha scales all components alike: weights alpha per model == alpha * TSV-M
    got = get_method("tsv_m").fn(torch.zeros(shape), ds, {"weight": [0.7] * n}, {}, name="w")
    torch.testing.assert_close(got.double(), paper.tsv_m(ds, 0.7), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_iso_c_is_the_papers_merge(shape):
    ds = tasks(3, shape, seed=1)
    torch.testing.assert_close(subspace.iso_c_delta(ds, "w").double(), paper.iso_c(ds), rtol=1e-4, atol=1e-4)
    got = get_method("iso_c").fn(torch.ones(shape), ds, {}, {"alpha": 1.3}, name="w")
    torch.testing.assert_close(got.double(), 1 + paper.iso_c(ds, 1.3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.2])
def test_iso_cts_is_the_papers_merge(shape, fraction):
    ds = tasks(3, shape, seed=2)
    want = paper.iso_cts(ds, fraction)
    torch.testing.assert_close(subspace.iso_cts_delta(ds, "w", fraction).double(), want, rtol=1e-4, atol=1e-4)


def test_iso_cts_sizes_divide_the_task_part_evenly():
    assert subspace.cts_sizes(9, 3, 0.8) == (6, 1)  # int(7.2) = 7 -> (9 - 7) / 3 rounds to 1 per task
    assert subspace.cts_sizes(4096, 8, 0.8) == (3280, 102)
    assert subspace.cts_sizes(10, 3, 1.0) == (10, 0)  # fraction 1: Iso-C over the common space


@pytest.mark.parametrize(("shape", "rank"), [((10, 6), None), ((3, 10), None), ((12, 10), 2)])
def test_wudi_is_the_minimiser_of_the_papers_loss(shape, rank):
    """The solve equals L-BFGS on the paper's loss from its initialisation; with too few task directions to
    pin every input direction (3x10 from 2 tasks, rank-2 tasks) the free part keeps sum_i tau_i's
    component, as gradient descent does."""
    ds = tasks(2 if shape[0] == 3 else 3, shape, seed=3, rank=rank)
    got = subspace.wudi_delta(ds, "w").double()
    want = paper.wudi(ds)
    taus = [d.double() for d in ds]
    assert float(paper.wudi_loss(got, taus)) <= float(paper.wudi_loss(want, taus)) * (1 + 1e-6) + 1e-9
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    g = torch.autograd.functional.jacobian(lambda t: paper.wudi_loss(t, taus), got)
    assert float(g.abs().max()) < 1e-6


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts", "wudi"])
@pytest.mark.parametrize("name", ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"])
def test_norms_and_vocabulary_tensors_take_the_mean_task_vector(method, name):
    g = torch.Generator().manual_seed(4)
    shape = (7,) if name.endswith("norm.weight") else (20, 6)
    ds = [torch.randn(shape, generator=g) for _ in range(3)]
    m = get_method(method)
    mp = {"weight": [1.0] * 3} if method == "tsv_m" else {}
    got = m.fn(torch.zeros(shape), ds, mp, {"alpha": 1.0}, name=name)
    torch.testing.assert_close(got, sum(ds) / 3)


def test_trial_independent_work_is_done_once(monkeypatch):
    """The SVDs run on the first trial only; an in-place change of a task vector (or other tensors) redoes
    them; a new set of task vectors gets its own entry."""
    calls = []
    real = subspace.tsv_components
    monkeypatch.setattr(subspace, "tsv_components", lambda ds, name: calls.append(name) or real(ds, name))
    ds = tasks(3, (12, 9))
    f = get_method("tsv_m").fn
    a = f(torch.zeros(12, 9), ds, {"weight": [1.0] * 3}, {}, name="w")
    b = f(torch.zeros(12, 9), ds, {"weight": [0.5] * 3}, {}, name="w")
    assert len(calls) == 1
    torch.testing.assert_close(b, a * 0.5)
    ds[1].mul_(2.0)
    f(torch.zeros(12, 9), ds, {"weight": [1.0] * 3}, {}, name="w")
    assert len(calls) == 2
    f(torch.zeros(12, 9), [d.clone() for d in ds], {"weight": [1.0] * 3}, {}, name="w")
    assert len(calls) == 3


def test_iso_cts_fraction_is_part_of_the_memo_key():
    ds = tasks(3, (16, 16), seed=5)
    f = get_method("iso_cts").fn
    a = f(torch.zeros(16, 16), ds, {}, {"alpha": 1.0, "common_fraction": 0.8}, name="w")
    b = f(torch.zeros(16, 16), ds, {}, {"alpha": 1.0, "common_fraction": 0.3}, name="w")
    torch.testing.assert_close(b.double(), paper.iso_cts(ds, 0.3), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, b)


def test_svd_failure_in_float32_is_retried_in_float64(monkeypatch):
    """LAPACK's float32 divide-and-conquer SVD can fail to converge on Iso-CTS's overlapping subspaces (seen in
    benchmarks/merge_kernels.py); the decomposition is then done in float64."""
    real = torch.linalg.svd

    def flaky(a, full_matrices=True):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(a, full_matrices=full_matrices)

    ds = tasks(3, (16, 16), seed=6)
    want = subspace.iso_cts_delta(ds, "w", 0.8)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    got = subspace.iso_cts_delta(ds, "w", 0.8)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

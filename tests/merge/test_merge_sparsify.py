"""Sparsification masks and their helpers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from optimizer.merge import kernels
from optimizer.merge import sparsify as sp
from tests.merge import merge_reference as ref


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(sp, "CHUNK", 1000)
    monkeypatch.setattr(sp, "_EXACT_BELOW", 500)
    monkeypatch.setattr(sp, "_SAMPLE", 128)


def test_seed_for_is_stable_across_processes_and_distinct():
    s = sp.seed_for(42, 3, "model.layers.0.mlp.up_proj.weight")
    code = "from optimizer.merge.sparsify import seed_for; print(seed_for(42, 3, 'model.layers.0.mlp.up_proj.weight'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123"}, cwd=".").stdout
    assert int(other) == s and 0 <= s < 2**63
    assert len({sp.seed_for(42, t, n) for t in range(3) for n in ("a", "b")}) == 6


def test_keep_count_matches_mergekit_truncation():
    assert sp.keep_count(0.29, 100) == 28  # int(28.999...) as mergekit
    assert sp.keep_count(0.001, 100) == 1 and sp.keep_count(0.0, 100) == 0 and sp.keep_count(1.0, 7) == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_order_stats_exact_on_sampled_path(tiny_chunks, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(40, 250, generator=g) * torch.linspace(0.1, 3, 250)).to(dtype)  # structured, bf16 ties
    a = x.abs().reshape(-1).double().sort().values
    ranks = [0, 1, 777, 5000, 9998, 9999]
    for r, s in zip(ranks, sp.order_stats(x, ranks), strict=True):
        assert s.value == a[r].item()
        assert s.n_less == int((a < a[r]).sum()) and s.n_equal == int((a == a[r]).sum())


def test_order_stats_falls_back_when_the_sample_misleads(tiny_chunks):
    x = torch.zeros(10_000)
    x[:: 10_000 // sp._SAMPLE] = 5.0  # exactly what the strided sample sees; most values are 0
    x[1] = 1.0
    n_zero = int((x == 0).sum())
    (s,) = sp.order_stats(x, [n_zero])
    assert (s.value, s.n_less, s.n_equal) == (1.0, n_zero, 1)


@pytest.mark.parametrize("density", [0.003, 0.25, 0.5, 0.9])
def test_magnitude_mask_matches_stable_topk_with_ties(tiny_chunks, density):
    x = torch.randint(-6, 7, (37, 100), generator=torch.Generator().manual_seed(1)).float()  # many ties
    m = sp.magnitude_mask(x, density)
    assert torch.equal(m, ref.magnitude(x, density))
    assert int(m.sum()) == sp.keep_count(density, x.numel())


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.01), (0.9, 0.05), (0.3, 0.0), (0.95, 0.1), (0.2, 0.9)])
def test_breadcrumbs_mask_matches_reference(tiny_chunks, density, gamma):
    x = torch.randint(-9, 10, (50, 60), generator=torch.Generator().manual_seed(2)).float()
    assert torch.equal(sp.breadcrumbs_mask(x, density, gamma), ref.breadcrumbs(x, density, gamma))


def test_window_inside_one_run_of_ties(tiny_chunks):
    x = torch.ones(3000)
    x[:10] = 0
    m = sp.window_mask(x, 1500, 2500)
    assert torch.equal(m, ref.stable_rank_mask(x, 1500, 2500))


def test_uniform16_and_random_mask_statistics():
    g = torch.Generator().manual_seed(0)
    u = sp.uniform16(1 << 20, g, torch.device("cpu")).float()
    assert u.min() == -32768 and u.max() == 32767 and abs(float(u.mean())) < 100
    for p in (0.1, 0.5, 0.9):
        m = sp.random_mask(torch.ones(1 << 18), p, g)
        assert abs(float(m.float().mean()) - p) < 0.005
    assert sp.random_mask(torch.ones(10), 1.0, g).all() and not sp.random_mask(torch.ones(10), 0.0, g).any()


def test_della_keep_prob_matches_mergekit_ranking():
    x = torch.randn(7, 33, generator=torch.Generator().manual_seed(3))
    got = sp.della_keep_prob(sp.della_rows(x), 0.5, 0.2).view(x.shape)
    torch.testing.assert_close(got.double(), ref.della_prob(x, 0.5, 0.2))
    clamped = sp.della_keep_prob(sp.della_rows(x), 0.9, 0.2)  # mergekit raises; we clamp to [0, 1]
    assert clamped.max() == 1.0 and clamped.min() == pytest.approx(0.7)
    v = sp.della_keep_prob(sp.della_rows(torch.randn(1, 1)), 0.4, 0.1)
    assert v.item() == pytest.approx(0.4)


def test_della_mask_statistics_follow_rank():
    x = torch.arange(1.0, 1001.0).repeat(200, 1)
    m = sp.della_mask(x, 0.5, 0.4, torch.Generator().manual_seed(0)).float().mean(0)
    assert abs(float(m.mean()) - 0.5) < 0.01
    assert float(m[:100].mean()) < 0.2 and float(m[-100:].mean()) > 0.8  # small magnitudes dropped more
    gain = sp.della_mask(x, 0.5, 0.4, torch.Generator().manual_seed(0), gain=True)
    assert torch.equal(gain > 0, sp.della_mask(x, 0.5, 0.4, torch.Generator().manual_seed(0)))
    assert abs(float((gain * x).sum() / x.sum()) - 1) < 0.02  # inverse-probability rescale is unbiased


def test_l1_rescale_preserves_the_norm():
    g = torch.Generator().manual_seed(5)
    d = torch.randn(100, 100, generator=g)
    got = kernels.task_arithmetic(torch.zeros_like(d), [d], [1.0], sparsify="random", densities=[0.3],
                                  rescale="l1", generator=g)
    assert float(got.abs().sum()) == pytest.approx(float(d.abs().sum()), rel=1e-5)
    assert abs(float((got != 0).float().mean()) - 0.3) < 0.02


def test_bf16_histogram_is_memoised_per_tensor_and_version():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4)).bfloat16()
    first = sp.magnitude_histogram(x)
    assert sp.magnitude_histogram(x) is first and int(first[-1]) == 1000
    x.mul_(2)  # in-place change bumps the version: recomputed
    assert sp.magnitude_histogram(x) is not first
    (s,) = sp.order_stats(x, [500])
    assert s.value == x.abs().float().sort().values[500].item()
    key = id(x)
    del x
    assert key not in sp._HIST_CACHE
    assert sp.magnitude_histogram(torch.ones(3)) is None

"""Defined edge behaviour of the registry and kernels: each documented trap has a test."""

from __future__ import annotations

import pytest
import torch

from optimizer.merge import kernels
from optimizer.merge.registry import METHODS, get_method


def _data(n=3, shape=(8, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), [torch.randn(shape, generator=g) for _ in range(n)]


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="known:.*task_arithmetic.*ties"):
        get_method("tie")


def test_param_lookup_and_scopes():
    m = get_method("della")
    assert m.param("epsilon").scope == "global" and m.param("density").scope == "model"
    assert {p.name for p in m.model_params} == {"weight", "density"}
    with pytest.raises(KeyError, match="declares"):
        m.param("gamma")
    for method in METHODS.values():
        for p in method.params:
            assert p.low <= p.search_low <= p.default <= p.search_high <= p.high or not p.searchable, (method.name, p)


def test_out_of_range_value_is_a_user_error():
    base, deltas = _data()
    with pytest.raises(ValueError, match=r"density=1.5 \(ties, tensor 'w'\) is outside"):
        get_method("ties").fn(base, deltas, {"weight": [1, 1, 1], "density": [1.5, 1, 1]}, {}, name="w")


def test_linear_weight_sum_must_be_positive():
    base, deltas = _data(2)
    for w in ([0.0, 0.0], [1.0, -2.0]):
        with pytest.raises(ValueError, match="positive sum"):
            kernels.linear_kernel(base, deltas, {"weight": w}, {"normalize": 1.0})
    # without normalisation any weights are fine: sum(w_i theta_i)
    got = kernels.linear_kernel(base, deltas, {"weight": [1.0, -2.0]}, {"normalize": 0.0})
    torch.testing.assert_close(got, (base + deltas[0]) - 2 * (base + deltas[1]))


def test_normalize_with_negative_weight_is_an_error_but_negation_without_it_works():
    base, deltas = _data(2)
    with pytest.raises(ValueError, match="negative weights"):
        kernels.task_arithmetic(base, deltas, [1.0, -0.5], sparsify="magnitude", consensus="sum",
                                normalize=True, densities=[0.5, 0.5])
    got = kernels.task_arithmetic(base, deltas, [1.0, -0.5])
    torch.testing.assert_close(got, base + deltas[0] - 0.5 * deltas[1])


def test_zero_weight_sum_falls_back_to_divisor_one():
    """As mergekit: all-zero weights under normalisation give the base, not 0/0."""
    base, deltas = _data()
    for name in ("ties", "della"):
        mp = {"weight": [0.0] * 3, "density": [0.5] * 3}
        got = get_method(name).fn(base, deltas, mp, {}, generator=torch.Generator().manual_seed(0))
        assert torch.equal(got, base)


def test_tiny_density_keeps_one_element():
    """density * numel < 1 keeps the single largest entry (mergekit asserts); density 0 keeps nothing."""
    base = torch.zeros(4, 5)
    delta = torch.arange(20.0).view(4, 5) - 7
    got = kernels.task_arithmetic(base, [delta], [1.0], sparsify="magnitude", densities=[0.01])
    assert torch.count_nonzero(got) == 1 and got.view(-1)[19] == 12
    got = kernels.task_arithmetic(base, [delta], [1.0], sparsify="magnitude", densities=[0.0])
    assert torch.count_nonzero(got) == 0


def test_breadcrumbs_small_gamma_drops_no_outliers_instead_of_everything():
    """int(gamma * numel) == 0: mergekit's indices[n_bot:-0] is empty (whole delta zeroed); we keep the top."""
    base = torch.zeros(10)
    delta = torch.arange(1.0, 11.0)
    got = kernels.task_arithmetic(base, [delta], [1.0], sparsify="breadcrumbs", densities=[0.5], gammas=[0.05])
    assert got.tolist() == [0.0] * 5 + [6.0, 7.0, 8.0, 9.0, 10.0]
    got = kernels.task_arithmetic(base, [delta], [1.0], sparsify="breadcrumbs", densities=[0.5], gammas=[0.2])
    assert got.tolist() == [0.0] * 3 + [4.0, 5.0, 6.0, 7.0, 8.0] + [0.0] * 2


@pytest.mark.parametrize("name", sorted(METHODS))
def test_shape_mismatch_names_the_tensor(name):
    base, deltas = _data(2)
    bad = [deltas[0][:4]] if METHODS[name].max_models == 1 else [deltas[0], deltas[1][:, :8]]
    with pytest.raises(ValueError, match="'model.embed_tokens.weight'.*shape"):
        METHODS[name].fn(base, bad, {}, {}, generator=torch.Generator(), name="model.embed_tokens.weight")


def test_model_count_limits():
    base, deltas = _data(2)
    with pytest.raises(ValueError, match="exactly one"):
        get_method("slerp").fn(base, deltas, {}, {"t": 0.5})
    with pytest.raises(ValueError, match="at least 2"):
        get_method("model_stock").fn(base, deltas[:1], {}, {})
    assert get_method("slerp").max_models == 1 and get_method("model_stock").min_models == 2
    for name, n in [("nuslerp", 3), ("nearswap", 2), ("arcee_fusion", 2), ("passthrough", 2)]:
        with pytest.raises(ValueError, match="exactly"):
            get_method(name).fn(base, (deltas * 2)[:n], {"weight": [1.0] * n}, {"t": 0.1})


def test_multislerp_refuses_a_zero_mean_direction():
    """Three unit directions that cancel have no mean on the sphere (mergekit raises too; two fall back to
    lerp)."""
    base = torch.zeros(2)
    ds = [torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 3**0.5 / 2]), torch.tensor([-0.5, -(3**0.5) / 2])]
    with pytest.raises(ValueError, match="zero"):
        get_method("multislerp").fn(base, ds, {"weight": [1.0] * 3}, {})
    got = get_method("multislerp").fn(base, [ds[0], -ds[0]], {"weight": [1.0, 1.0]}, {})
    assert got.tolist() == [0.0, 0.0]


def test_stochastic_methods_need_a_generator():
    base, deltas = _data()
    for name in ("dare_ties", "della"):
        assert get_method(name).stochastic
        with pytest.raises(ValueError, match="Generator"):
            get_method(name).fn(base, deltas, {}, {})


def test_density_one_disables_sparsification():
    base, deltas = _data()
    mp = {"weight": [0.5] * 3, "density": [1.0] * 3}
    want = kernels.task_arithmetic(base, deltas, [0.5] * 3)
    for name in ("dare_linear", "della_linear", "breadcrumbs"):
        got = get_method(name).fn(base, deltas, mp, {}, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(got, want)


def test_slerp_extremes_and_colinear_fallback():
    base, (delta,) = _data(1)
    f = get_method("slerp").fn
    torch.testing.assert_close(f(base, [delta], {}, {"t": 0.0}), base)
    torch.testing.assert_close(f(base, [delta], {}, {"t": 1.0}), base + delta)
    # colinear: |cos| > 0.9995 -> plain lerp
    torch.testing.assert_close(f(base, [base * 0.5], {}, {"t": 0.25}), base * 1.125)
    assert kernels.slerp_coefs(0.5, 0.0, 1.0, 1.0) == pytest.approx((2**-0.5, 2**-0.5))


def test_model_stock_ratio_formula_and_guard():
    gram = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    assert float(kernels.model_stock_ratio(gram, 2)) == pytest.approx(2 * 0.5 / 1.5)
    opposite = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # 1 + (N-1) cos = 0: defined as t = 0 (the base)
    assert float(kernels.model_stock_ratio(opposite, 2)) == 0.0


def test_rescale_option_spellings():
    base, deltas = _data()
    mp = {"weight": [1.0] * 3, "density": [0.5] * 3}
    f = get_method("dare_linear").fn
    a = f(base, deltas, mp, {"rescale": 2.0}, generator=torch.Generator().manual_seed(1))
    b = f(base, deltas, mp, {"rescale": "inverse_density"}, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="rescale"):
        f(base, deltas, mp, {"rescale": "l3"}, generator=torch.Generator())

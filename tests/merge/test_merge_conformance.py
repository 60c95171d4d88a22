"""Conformance suite: every registered merge method against an independent reference and shared properties."""

from __future__ import annotations

import pytest
import torch

from optimizer.merge import sparsify as sp
from optimizer.merge.registry import METHODS
from tests.merge import merge_reference as ref
from tests.merge import subspace_reference as sref

ALL = sorted(METHODS)
# (sparsify, consensus) of each task-arithmetic preset, as mergekit's registry declares them
PRESETS = {
    "task_arithmetic": (None, None), "ties": ("magnitude", "sum"), "dare_ties": ("random", "sum"),
    "dare_linear": ("random", None), "breadcrumbs": ("breadcrumbs", None),
    "breadcrumbs_ties": ("breadcrumbs", "sum"), "della": ("della", "sum"), "della_linear": ("della", None),
}
OTHERS = {"linear", "slerp", "model_stock", "passthrough", "nuslerp", "multislerp", "karcher", "sce", "nearswap",
          "arcee_fusion", "ram", "ramplus_tl", "tsv_m", "iso_c", "iso_cts", "wudi"}
# the merged delta of these is not odd in the task vectors (norms, softmaxes or the models' own weights)
NOT_ODD = {"slerp", "passthrough", "karcher", "arcee_fusion"}
SHAPE = (64, 100)
# SVD-based methods compute their (float32, as the papers) decompositions once; the float64 transcriptions
# agree to float32 accuracy of an SVD, not of a sum
TOL = {name: 1e-4 for name in ("tsv_m", "iso_c", "iso_cts", "wudi")}


def test_every_method_is_covered():
    assert set(ALL) == set(PRESETS) | OTHERS


@pytest.fixture(params=["one_chunk", "tiny_chunks"])
def chunking(request, monkeypatch):
    """Run each test with the default chunking and with chunks small enough to split every tensor (and to
    exercise the sampled order-statistic path)."""
    if request.param == "tiny_chunks":
        monkeypatch.setattr(sp, "CHUNK", 256)
        monkeypatch.setattr(sp, "_EXACT_BELOW", 300)
        monkeypatch.setattr(sp, "_SAMPLE", 64)
    return request.param


def n_models(name: str) -> int:
    m = METHODS[name]
    return m.max_models if m.max_models is not None else 3


def inputs(name: str, seed: int = 0, dyadic: bool = True, dtype=torch.float32):
    """Base and task vectors; dyadic values (multiples of 1/8) make fp32 sums exact and create magnitude ties
    (used for the task-arithmetic family, whose masks break ties by position)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g)
    scales = [1.0, 0.5, 2.0]
    deltas = [torch.randn(SHAPE, generator=g) * s for s in scales[: n_models(name)]]
    if dyadic and name in PRESETS:
        base, deltas = (base * 8).round() / 8, [(d * 8).round() / 8 for d in deltas]
    return base.to(dtype), [d.to(dtype) for d in deltas]


def params(name: str):
    n = n_models(name)
    mp = {"weight": [0.75, 0.5, 0.25][:n], "density": [0.5, 0.25, 0.75][:n], "gamma": [0.05, 0.02, 0.1][:n],
          "scale": [0.75]}
    gp = {"t": 0.3, "epsilon": 0.125, "lambda": 1.25, "filter_wise": 0.0, "select_topk": 0.5, "alpha": 0.75,
          "r": 0.5}
    m = METHODS[name]
    return ({p.name: mp[p.name] for p in m.model_params},
            {p.name: gp.get(p.name, p.default) for p in m.global_params})


def run(name, base, deltas, mp, gp, seed=7, **kw):
    g = torch.Generator().manual_seed(seed) if METHODS[name].stochastic else None
    return METHODS[name].fn(base, deltas, mp, gp, generator=g, name="t", **kw)


def _reference_other(name, base, deltas, mp, gp):
    w, b = mp.get("weight"), base.double()
    if name == "linear":
        return ref.linear(base, deltas, w, bool(gp["normalize"]))
    if name == "slerp":
        return ref.slerp(base, deltas[0], gp["t"])
    if name == "model_stock":
        return ref.model_stock(base, deltas, bool(gp["filter_wise"]))
    if name == "passthrough":
        return ref.passthrough(base, deltas[0], mp["scale"][0])
    if name == "nuslerp":
        return b + ref.nuslerp(w[1] / (w[0] + w[1]), deltas[0], deltas[1], bool(gp["nuslerp_flatten"]),
                               bool(gp["nuslerp_row_wise"]))
    if name == "multislerp":
        return b + ref.multislerp(deltas, w)
    if name == "karcher":
        return ref.karcher([base + d for d in deltas], int(gp["max_iter"]), gp["tol"])
    if name == "sce":
        return ref.sce(base, deltas, gp["select_topk"])
    if name == "nearswap":
        return ref.nearswap(base, deltas[0], gp["t"])
    if name == "arcee_fusion":
        return ref.arcee_fusion(base, deltas[0])
    if name in ("ram", "ramplus_tl"):
        return ref.ram(base, deltas, gp["epsilon"], gp.get("r"), gp.get("alpha"))
    if name == "tsv_m":
        return b + sum(wi * c for wi, c in zip(w, _tsv_parts(deltas), strict=True))
    if name == "iso_c":
        return b + sref.iso_c(deltas, gp["alpha"])
    if name == "iso_cts":
        return b + sref.iso_cts(deltas, gp["common_fraction"], gp["alpha"])
    if name == "wudi":
        return b + gp["alpha"] * sref.wudi(deltas)
    raise KeyError(name)


def _tsv_parts(deltas):
    """Each task's share of the paper's TSV-M sum (its block of the whitened bases), from the transcription."""
    k = min(deltas[0].shape) // len(deltas)
    parts = [sref.low_rank(d.double(), k) for d in deltas]
    u = sref.whiten(torch.cat([p[0] for p in parts], 1))
    v = sref.whiten(torch.cat([p[2] for p in parts], 1))
    return [u[:, i * k:(i + 1) * k] @ torch.diag(p[1]) @ v[:, i * k:(i + 1) * k].T for i, p in enumerate(parts)]


def reference(name, base, deltas, mp, gp, seed=7):
    if name in OTHERS:
        return _reference_other(name, base, deltas, mp, gp)
    spars, consensus = PRESETS[name]
    dens = mp.get("density", [1.0] * len(deltas))
    rescale = {0: None, 1: "l1", 2: "inverse_density"}[int(gp.get("rescale", 0))]
    masks, gains = None, None
    if spars == "magnitude":
        masks = [ref.magnitude(d, p) for d, p in zip(deltas, dens, strict=True)]
    elif spars == "breadcrumbs":
        masks = [ref.breadcrumbs(d, p, gm) for d, p, gm in zip(deltas, dens, mp["gamma"], strict=True)]
    elif spars in ("random", "della"):  # the same draws, in the kernel's order (model by model)
        g = torch.Generator().manual_seed(seed)
        gain = spars == "della" and rescale == "inverse_density"
        masks = [sp.random_mask(d, p, g) if spars == "random" else sp.della_mask(d, p, gp["epsilon"], g, gain=gain)
                 for d, p in zip(deltas, dens, strict=True)]
        gains = masks if gain else None
    return ref.gta(base, deltas, mp["weight"], masks, consensus, bool(gp["normalize"]), gp.get("lambda", 1.0),
                   rescale, dens, gains)


@pytest.mark.parametrize("name", ALL)
def test_matches_reference(name, chunking):
    base, deltas = inputs(name)
    mp, gp = params(name)
    got = run(name, base, deltas, mp, gp)
    assert got.dtype == base.dtype and got.shape == base.shape
    tol = TOL.get(name, 1e-5)
    torch.testing.assert_close(got.double(), reference(name, base, deltas, mp, gp), rtol=tol, atol=tol)


OPTION_CASES = [(n, v) for n in ("ties", "dare_linear", "della", "della_linear", "breadcrumbs_ties", "linear")
                for v in ("rescale_inverse", "rescale_l1", "normalize_flipped")
                if v == "normalize_flipped" or n != "linear"]  # linear has no rescale


@pytest.mark.parametrize(("name", "variant"), OPTION_CASES)
def test_matches_reference_options(name, variant):
    base, deltas = inputs(name, seed=3)
    mp, gp = params(name)
    if variant == "normalize_flipped":
        gp["normalize"] = 1.0 - gp["normalize"]
    else:
        gp["rescale"] = 2.0 if variant == "rescale_inverse" else 1.0
    torch.testing.assert_close(run(name, base, deltas, mp, gp).double(), reference(name, base, deltas, mp, gp),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("flatten", "row_wise"), [(0.0, 0.0), (0.0, 1.0)])
def test_nuslerp_row_and_column_modes(flatten, row_wise):
    base, deltas = inputs("nuslerp", seed=4)
    mp, gp = params("nuslerp")
    gp |= {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    torch.testing.assert_close(run("nuslerp", base, deltas, mp, gp).double(),
                               reference("nuslerp", base, deltas, mp, gp), rtol=1e-5, atol=1e-5)


def test_optional_base_methods_on_weights():
    """nuslerp / multislerp without a base (a recipe with no base_model) interpolate the models themselves."""
    base, deltas = inputs("nuslerp", seed=5)
    mp, gp = params("nuslerp")
    got = run("nuslerp", base, deltas, mp, gp | {"on_weights": True})
    torch.testing.assert_close(got.double(), ref.nuslerp(0.5 / 1.25, base + deltas[0], base + deltas[1]),
                               rtol=1e-5, atol=1e-5)
    three = deltas + [deltas[0] * -0.5]
    mp3 = {"weight": [0.75, 0.5, 0.25]}
    got = run("multislerp", base, three, mp3, {"on_weights": True})
    torch.testing.assert_close(got.double(), ref.multislerp([base + d for d in three], mp3["weight"]),
                               rtol=1e-5, atol=1e-5)


NOT_IDENTITY = {"arcee_fusion", "iso_c", "iso_cts"}  # keep only outliers / flatten the spectrum of one model


def identity_params(name: str):
    values = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "t": 1e3 if name == "nearswap" else 1.0,
              "lambda": 1.0, "epsilon": 0.1 if name.startswith("della") else 1e-5, "scale": 1.0, "alpha": 1.0}
    m = METHODS[name]
    copies = 2 if name in ("model_stock", "nuslerp") else 1
    return ({p.name: [values[p.name]] * copies for p in m.model_params},
            {p.name: values.get(p.name, p.default) for p in m.global_params})


@pytest.mark.parametrize("name", [n for n in ALL if n not in NOT_IDENTITY])
def test_single_model_identity(name):
    """Weight 1, density 1 (t=1 for slerp; two copies of one model for model_stock and nuslerp) gives base +
    delta."""
    base, deltas = inputs(name, dyadic=False)
    deltas = deltas[:1] * (2 if name in ("model_stock", "nuslerp") else 1)
    mp, gp = identity_params(name)
    torch.testing.assert_close(run(name, base, deltas, mp, gp), base + deltas[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in ALL if n not in NOT_ODD])
def test_negating_task_vectors_negates_the_merge(name):
    base, deltas = inputs(name, dyadic=False)
    mp, gp = params(name)
    pos = run(name, base, deltas, mp, gp) - base
    neg = run(name, base, [-d for d in deltas], mp, gp) - base
    torch.testing.assert_close(neg, -pos, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in ALL if n != "slerp" and not METHODS[n].stochastic])
def test_model_order_does_not_matter(name):
    base, deltas = inputs(name, dyadic=False)
    mp, gp = params(name)
    perm = [2, 0, 1] if len(deltas) == 3 else list(reversed(range(len(deltas))))
    mp2 = {k: [v[i] for i in perm] for k, v in mp.items()}
    tol = TOL.get(name, 1e-5)
    torch.testing.assert_close(run(name, base, [deltas[i] for i in perm], mp2, gp),
                               run(name, base, deltas, mp, gp), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ALL)
def test_randomness_comes_only_from_the_generator(name):
    """Whatever the global RNG state, the same generator seed gives the same bits; a deterministic method does
    not consume the generator it is handed; a random-mask method's result changes with the seed."""
    base, deltas = inputs(name, dyadic=False)
    mp, gp = params(name)
    torch.manual_seed(1)
    first = run(name, base, deltas, mp, gp, seed=11)
    torch.manual_seed(2)
    torch.rand(100)
    assert torch.equal(first, run(name, base, deltas, mp, gp, seed=11))
    if METHODS[name].stochastic:
        assert not torch.equal(first, run(name, base, deltas, mp, gp, seed=12))
    else:
        g = torch.Generator().manual_seed(3)
        state = g.get_state()
        METHODS[name].fn(base, deltas, mp, gp, generator=g, name="t")
        assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_out_in_place(name, out_dtype):
    base, deltas = inputs(name, dyadic=False)
    mp, gp = params(name)
    expected = run(name, base, deltas, mp, gp)
    out = torch.full(SHAPE, float("nan"), dtype=out_dtype)
    got = run(name, base, deltas, mp, gp, out=out)
    assert got is out
    torch.testing.assert_close(out, expected.to(out_dtype))
    aliased = base.clone()  # out may be the very tensor read as base (each chunk is read before written)
    run(name, aliased, deltas, mp, gp, out=aliased)
    torch.testing.assert_close(aliased, expected)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_untouched(name, dtype):
    base, deltas = inputs(name, dyadic=False, dtype=dtype)
    copies = [base.clone()] + [d.clone() for d in deltas]
    run(name, base, deltas, *params(name))
    assert all(torch.equal(a, b) for a, b in zip(copies, [base, *deltas], strict=True))


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_inputs(name):
    base, deltas = inputs(name, dtype=torch.bfloat16, dyadic=False)
    mp, gp = params(name)
    got = run(name, base, deltas, mp, gp)
    assert got.dtype == torch.bfloat16
    want = reference(name, base, deltas, mp, gp)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ALL)
def test_noncontiguous_out(name):
    base, deltas = inputs(name, dyadic=False)
    mp, gp = params(name)
    out = torch.empty(SHAPE[::-1]).T
    run(name, base, deltas, mp, gp, out=out)
    torch.testing.assert_close(out, run(name, base, deltas, mp, gp))


@pytest.mark.parametrize("name", ALL)
def test_storage_precision_on_float32_inputs(name):
    """``precision: storage`` computes in the tensors' dtype, op by op as mergekit: on float32 inputs it is
    the same merge as the default (masks with mergekit's sort order: no magnitude ties here)."""
    base, deltas = inputs(name, dyadic=False)
    mp, gp = params(name)
    got = run(name, base, deltas, mp, gp | {"precision": "storage"})
    tol = TOL.get(name, 1e-5)
    torch.testing.assert_close(got.double(), reference(name, base, deltas, mp, gp), rtol=tol, atol=tol)


def test_unknown_precision_is_refused():
    base, deltas = inputs("ties")
    with pytest.raises(ValueError, match="precision"):
        run("ties", base, deltas, *params("ties")[:1], params("ties")[1] | {"precision": "fp8"})

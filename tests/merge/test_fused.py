"""The compiled one-pass merge kernels (optimizer/merge/fused.py) against the eager kernels.

Every registered method runs with the fused path on and off on the same inputs: methods the fused kernels
cover agree to float32 rounding (a fused multiply-add may differ in the last bit) and keep exactly the same
elements; the others are bit-identical (they never take the fused path). Compiling costs seconds per
variant, so the tensors are built once per module and each method is compiled for one dtype combination.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from optimizer import UserError
from optimizer.merge import fused
from optimizer.merge import sparsify as sp
from optimizer.merge.registry import METHODS
from optimizer.merge.sparsify import seed_for
from optimizer.merge.task_arithmetic import task_arithmetic
from optimizer.merge.tensor_ops import clear_memo, weighted_sum

pytestmark = pytest.mark.skipif(fused.available(torch.device("cpu")) is not None,
                                reason=f"torch.compile cannot build here: {fused.available(torch.device('cpu'))}")

# two tie-search blocks and a ragged tail: every code path of fused.tie_position
N = 2 * (1 << 16) + 4099
# methods that must take the compiled path (others may: every kernel that writes through weighted_sum does)
MUST_FUSE = {"task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "linear", "passthrough", "slerp",
             "model_stock"}


@pytest.fixture
def on():
    fused.enable(True)
    yield
    fused.enable(False)


def bf16_inputs(k: int, seed: int = 0, n: int = N):
    """bf16 base and task vectors with many magnitude ties (values on a coarse grid)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    deltas = [((torch.randn(n, generator=g) * 64).round() / 2048).to(torch.bfloat16) for _ in range(k)]
    return base.view(-1, 1), [d.view(-1, 1) for d in deltas]


def run(name: str, base, deltas, out_dtype, trial: int = 0):
    m = METHODS[name]
    k = len(deltas) if m.max_models is None else min(len(deltas), m.max_models)
    # each model a different value inside the searched range (different masks and weights per model)
    mp = {p.name: [p.search_low + (p.search_high - p.search_low) * (0.3 + 0.2 * i) for i in range(k)]
          if p.searchable else [p.default] * k for p in m.model_params}
    gp = {p.name: p.default for p in m.global_params}
    gen = torch.Generator().manual_seed(seed_for(0, trial, "t")) if m.stochastic else None
    out = torch.empty(base.shape, dtype=out_dtype)
    return m.fn(base, deltas[:k], mp, gp, generator=gen, out=out, name="t")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_agrees_with_the_eager_kernels(name, monkeypatch):
    base, deltas = bf16_inputs(3)
    clear_memo()
    fused.enable(False)
    eager = run(name, base, deltas, torch.bfloat16)
    ran = []
    real = fused._run
    monkeypatch.setattr(fused, "_run", lambda kernel, *a: ran.append(kernel) or real(kernel, *a))
    fused.enable(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a compiler failure would fall back silently
            got = run(name, base, deltas, torch.bfloat16)
    finally:
        fused.enable(False)
    assert bool(ran) or name not in MUST_FUSE, f"{name} never reached the fused kernels"
    if not ran:
        assert torch.equal(got, eager)
        return
    diff = (got.float() - eager.float()).abs()
    ulp = eager.float().abs().clamp_min(2.0**-20) * 2.0**-7  # one bf16 ulp of the value
    assert bool((diff <= ulp).all()), f"{name}: max difference {float(diff.max())}"
    assert int((got != eager).sum()) <= max(10, N // 1000)  # rounding, on a few elements only


@pytest.mark.parametrize("sparsify,density,gamma", [("magnitude", 0.37, 0.0), ("magnitude", 0.9, 0.0),
                                                    ("breadcrumbs", 0.5, 0.07)])
def test_masks_keep_exactly_the_eager_elements(on, sparsify, density, gamma):
    """Base 0 and weight 1 make the merge the masked task vector itself (no rounding): the fused rank window,
    its tie positions included, keeps the very elements the eager one does."""
    _, deltas = bf16_inputs(1, seed=3)
    base = torch.zeros_like(deltas[0], dtype=torch.float32)
    d = deltas[0].float()
    kw = dict(sparsify=sparsify, densities=[density], gammas=[gamma])
    got = task_arithmetic(base, [d], [1.0], out=torch.empty_like(base), **kw)
    fused.enable(False)
    eager = task_arithmetic(base, [d], [1.0], out=torch.empty_like(base), **kw)
    assert torch.equal(got, eager)
    # the window's size (zeros of the grid fall below every window here), tie splits by position included
    assert int((got != 0).sum()) == sp.keep_count(density, d.numel())


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_consensus_with_a_dropped_model_matches_eager(on, consensus, normalize):
    """A model with weight 0 (dropped by the eager kernel) goes through the compiled kernel as an empty
    window: same merge, and no recompile for the smaller model count."""
    base, deltas = bf16_inputs(3, seed=5)
    kw = dict(sparsify="magnitude", consensus=consensus, normalize=normalize, densities=[0.5, 0.3, 0.7],
              lambda_=0.9)
    got = task_arithmetic(base, deltas, [0.6, 0.0, 0.8], out=torch.empty(base.shape), **kw)
    fused.enable(False)
    eager = task_arithmetic(base, deltas, [0.6, 0.0, 0.8], out=torch.empty(base.shape), **kw)
    torch.testing.assert_close(got, eager, rtol=2e-7, atol=1e-7)


def test_weighted_sum_writes_in_place_over_its_base(on):
    base, deltas = bf16_inputs(2, seed=7)
    expect = weighted_sum(base.clone(), 1.0, deltas, [0.5, -0.25], torch.empty(base.shape))
    live = base.float()
    weighted_sum(live, 1.0, deltas, [0.5, -0.25], live)  # out aliases base, as a live fp32 parameter
    torch.testing.assert_close(live, expect, rtol=0, atol=0)


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(on, monkeypatch):
    base, deltas = bf16_inputs(2, seed=9, n=4096)
    fused.enable(False)
    eager = weighted_sum(base, 1.0, deltas, [0.3, 0.4], torch.empty(base.shape))
    fused.enable(True)

    def broken(*_, **__):
        raise RuntimeError("C++ compile error: no such header\nmore detail")

    monkeypatch.setattr(fused, "_compiled", lambda name, fn: broken)
    with pytest.warns(RuntimeWarning, match="switched off.*C\\+\\+ compile error: no such header"):
        got = weighted_sum(base, 1.0, deltas, [0.3, 0.4], torch.empty(base.shape))
    assert not fused.enabled()
    assert torch.equal(got, eager)


def test_past_the_recompile_limit_the_eager_kernels_take_over(on):
    """A new variant beyond Dynamo's recompile limit is an error, so the chunked eager kernel runs instead of
    the formula uncompiled on whole tensors."""
    import torch._dynamo

    base, deltas = bf16_inputs(3, seed=13, n=4096)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            weighted_sum(base, 1.0, deltas[:2], [0.3, 0.4], torch.empty(base.shape))  # variant 1: two models
            assert fused.enabled()
            with pytest.warns(RuntimeWarning, match="switched off"):
                got = weighted_sum(base, 1.0, deltas, [0.3, 0.4, 0.5], torch.empty(base.shape))  # variant 2
    finally:
        torch._dynamo.reset()
    assert not fused.enabled()
    assert torch.equal(got, weighted_sum(base, 1.0, deltas, [0.3, 0.4, 0.5], torch.empty(base.shape)))


def test_tie_position_matches_the_eager_search(on):
    _, deltas = bf16_inputs(1, seed=11)
    d = deltas[0]
    value = float(d.float().abs().view(-1)[N // 2])
    ties = int((d.float().abs() == value).sum())
    assert ties > 10
    for j in (0, ties // 2, ties - 1):
        got = fused.tie_position(d, value, j)
        fused.enable(False)
        assert got == sp.tie_position(d, value, j)
        fused.enable(True)
    with pytest.raises(ValueError, match="fewer than"):
        fused.tie_position(d, value, ties)


def test_set_fused_choices(tiny_models, monkeypatch):
    """auto is off for small models, on/off are honoured; a bad value, or `on` where nothing can compile,
    is a UserError naming the key."""
    from omegaconf import OmegaConf

    from optimizer.config import ModelsConfig
    from optimizer.models import ModelSet
    from optimizer.session import set_fused

    cfg = OmegaConf.structured(ModelsConfig)
    cfg.base, cfg.models = str(tiny_models["base"]), {"a": str(tiny_models["a"])}
    models = ModelSet(cfg)
    cpu = torch.device("cpu")
    try:
        assert set_fused("auto", cpu, models).startswith("eager") and not fused.enabled()
        assert set_fused("on", cpu, models) == "fused merge kernels on" and fused.enabled()
        assert set_fused(False, cpu, models).startswith("eager") and not fused.enabled()
        with pytest.raises(UserError, match="fused_kernels='sometimes' is not a choice"):
            set_fused("sometimes", cpu, models)
        monkeypatch.setattr(fused, "available", lambda device: "no C++ compiler (g++, c++ or clang++) on PATH")
        with pytest.raises(UserError, match="fused_kernels=on, but .* cannot run on cpu: no C\\+\\+ compiler"):
            set_fused("on", cpu, models)
        assert set_fused("auto", cpu, models).startswith("eager merge kernels (no C++ compiler")
    finally:
        fused.enable(False)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_study_with_fused_kernels_matches_one_without(tiny_models, tmp_path, capsys, method):
    """The real study loop with fused_kernels=on: same trial values and exported weights as with off (to
    float32 rounding), the console says which kernels ran, and the process is left as it was."""
    from safetensors.torch import load_file

    from optimizer.runner import run
    from tests.test_runner import load, make_cfg

    values, weights = {}, {}
    for mode in ("on", "off"):
        cfg = make_cfg(tiny_models, tmp_path / mode, n_trials=4, fused_kernels=mode, merge={"method": method},
                       sampler={"name": "random"})
        if method == "ties":
            cfg.merge.bounds = {"weight": [0.0, 1.5], "density": [0.2, 1.0]}
            cfg.merge.baselines = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.7}]
        assert run(cfg) == 0
        out = capsys.readouterr().out
        assert ("fused merge kernels on" if mode == "on" else "eager merge kernels (fused_kernels=off)") in out
        values[mode] = [t.value for t in load(cfg).trials]
        weights[mode] = load_file(str(next((tmp_path / mode / "runs" / "t" / "best").glob("*.safetensors"))))
    # the recipe says which kernels merged the trial; re-applying it uses them: the exported model, bit for bit
    best = tmp_path / "on" / "runs" / "t" / "best"
    assert "kernels: fused" in (best / "recipe.yaml").read_text()
    assert "kernels:" not in (tmp_path / "off" / "runs" / "t" / "best" / "recipe.yaml").read_text()
    from optimizer.merge.run_recipe import merge_recipe

    again = merge_recipe(best / "recipe.yaml", tmp_path / "again", log=lambda _: None)
    assert not fused.enabled()  # merge_recipe leaves the switch as it found it
    redo = load_file(str(next(again.glob("*.safetensors"))))
    assert redo.keys() == weights["on"].keys()
    assert all(torch.equal(redo[k], weights["on"][k]) for k in redo)
    assert values["on"] == pytest.approx(values["off"], rel=1e-5, abs=1e-7)
    assert weights["on"].keys() == weights["off"].keys()
    for name, w in weights["on"].items():
        torch.testing.assert_close(w, weights["off"][name], rtol=1e-5, atol=1e-6)


def test_recipe_kernels_choice_and_its_errors(tiny_models, tmp_path, monkeypatch):
    """`--kernels fused` where nothing compiles is exit 2; a recipe that asks for them falls back with a
    warning line; an unknown value is refused."""
    from optimizer.merge.run_recipe import merge_recipe

    def recipe(kernels: str | None) -> str:
        ext = f"merge_optimizer: {{kernels: {kernels}}}\n" if kernels else ""
        text = (f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\nmodels:\n"
                f"  - model: {tiny_models['a']}\n    parameters: {{weight: 0.5}}\ndtype: float32\n{ext}")
        path = tmp_path / f"r_{kernels}.yaml"
        path.write_text(text)
        return str(path)

    with pytest.raises(UserError, match="merge_optimizer.kernels='turbo' is unknown"):
        merge_recipe(recipe("turbo"), tmp_path / "x")
    monkeypatch.setattr(fused, "available", lambda device: "no C++ compiler (g++, c++ or clang++) on PATH")
    with pytest.raises(UserError, match="--kernels fused, but the compiled merge kernels cannot run on cpu"):
        merge_recipe(recipe(None), tmp_path / "y", kernels="fused")
    lines: list[str] = []
    merge_recipe(recipe("fused"), tmp_path / "z", log=lines.append)
    assert any("warning: the recipe's study merged with the compiled kernels" in line for line in lines)
    assert (tmp_path / "z" / "config.json").exists() and not fused.enabled()

"""A study's exported recipe re-applied with `python -m optimizer.merge` gives the exported weights bit for bit,
for a deterministic (TIES) and a stochastic (DARE-TIES: seed and trial travel in the recipe) method; and for
every registered method, a plan applied in memory equals its recipe re-applied from disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

from optimizer.config import MergeConfig, ModelsConfig
from optimizer.export.cli import export
from optimizer.merge.apply import Applier
from optimizer.merge.recipe import MERGEKIT_EXTENSION, plan_doc
from optimizer.merge.registry import METHODS
from optimizer.merge.run_recipe import merge_recipe
from optimizer.models import ModelSet
from optimizer.plan import MergePlan
from optimizer.runner import run
from optimizer.space import SearchSpace, derive_layout

from ..test_runner import load, make_cfg
from . import oracle

ROOT = Path(__file__).resolve().parents[2]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def reapply(recipe: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    r = subprocess.run([sys.executable, "-m", "optimizer.merge", str(recipe), str(out), "--device", "cpu", *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return weights(out)


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module", params=["ties", "dare_ties"])
def study(request, tiny_models, tmp_path_factory):
    """A 4-trial layer-wise study (seed 7) with its best trial and its last trial exported."""
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = make_cfg(tiny_models, tmp, n_trials=4, seed=7, device="cpu", merge={
        "method": request.param, "baselines": [{"weight": 1.0, "density": 0.5}],
        "bounds": {"weight": [0.0, 1.5], "density": [0.3, 1.0]}})
    assert run(cfg) == 0
    last = max(t.number for t in load(cfg).trials)
    assert export(OmegaConf.merge(cfg, {"trial": last})) == 0
    return cfg, tmp / "runs" / "t", last


def test_best_recipe_reproduces_the_best_model(study, tmp_path):
    cfg, run_dir, _ = study
    best = run_dir / "best"
    doc = yaml.safe_load((best / "recipe.yaml").read_text())
    assert doc["merge_method"] == cfg.merge.method
    assert isinstance(doc["parameters"]["normalize"], bool) and isinstance(doc["parameters"]["rescale"], bool)
    if cfg.merge.method == "dare_ties":
        assert doc["merge_optimizer"] == {"seed": 7, "trial": load(cfg).best_trial.number, "device": "cpu"}
    assert_bit_equal(weights(best), reapply(best / "recipe.yaml", tmp_path / "out"))


def test_a_later_trial_reproduces_and_needs_its_trial_number(study, tmp_path):
    cfg, run_dir, last = study
    folder = run_dir / f"trial_{last}"
    exported = weights(folder)
    assert_bit_equal(exported, reapply(folder / "recipe.yaml", tmp_path / "out"))
    if cfg.merge.method == "dare_ties":  # the masks depend on (seed, trial): another trial draws others
        other = reapply(folder / "recipe.yaml", tmp_path / "other", "--trial", str(last + 1))
        assert any(not torch.equal(exported[k], other[k]) for k in exported if "layers" in k)


def test_exported_recipe_is_accepted_by_mergekit(study, tmp_path):
    """mergekit parses and runs the recipe; for TIES it also gives the same weights (within float error)."""
    oracle.require()
    cfg, run_dir, _ = study
    best = run_dir / "best"
    theirs = oracle.run_mergekit(yaml.safe_load((best / "recipe.yaml").read_text()), tmp_path / "mk")
    ours = weights(best)
    assert set(theirs) == set(ours)
    if cfg.merge.method == "ties":
        worst = max(float((theirs[k] - ours[k]).abs().max()) for k in ours)
        assert worst <= 1e-5



def live_setup(tiny_models, models):
    """ModelSet, live model and Applier for the base plus `models`, on CPU."""
    cfg = OmegaConf.merge(OmegaConf.structured(ModelsConfig), {"base": str(tiny_models["base"]),
                                                               "models": {m: str(tiny_models[m]) for m in models}})
    ms = ModelSet(cfg)
    live = ms.load_live(torch.device("cpu"))
    return ms, live, Applier(live, ms.load_resident(torch.device("cpu")))


def plan_for(method: str, models, names, rescale: float | None = None) -> MergePlan:
    """A layer-wise plan with distinct in-bounds values per unit (and a pinned rescale mode if given)."""
    spec = METHODS[method]
    merge: dict = {"method": method}
    if rescale is not None:
        merge |= {"search": [p.name for p in spec.params if p.searchable], "params": {"rescale": rescale}}
    space = SearchSpace(spec, models, derive_layout(names, "layer"),
                        OmegaConf.merge(OmegaConf.structured(MergeConfig), merge))
    values = {p.name: p.low + (p.high - p.low) * (0.3 + 0.1 * (i % 5)) for i, p in enumerate(space.params)}
    return space.plan(values)


CASES = [(m, None) for m in sorted(METHODS)] + [("dare_linear", 2.0), ("della", 2.0), ("dare_ties", 0.0)]


@pytest.mark.parametrize("method,rescale", CASES)
def test_every_method_plan_reapplies_bit_exactly(method, rescale, tiny_models, tmp_path):
    """In-memory Applier (what a trial scores) == the recipe plan_doc writes, re-applied from disk."""
    spec = METHODS[method]
    ms, live, applier = live_setup(tiny_models, ["a", "b"][: spec.max_models or 2])
    plan = plan_for(method, ms.names, ms.tensor_names, rescale)
    applier.apply(plan, seed=5, trial=9)
    doc = plan_doc(plan, {m: str(tiny_models[m]) for m in plan.models}, str(tiny_models["base"]), "float32",
                   extension={"seed": 5, "trial": 9} if spec.stochastic else None)
    if rescale == 2.0:  # inverse-density: mergekit's nearest (L1) for mergekit, ours in the extension key
        assert doc["parameters"]["rescale"] is True and doc[MERGEKIT_EXTENSION]["rescale"] == "inverse_density"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    merge_recipe(tmp_path / "r.yaml", tmp_path / "out", device="cpu", log=lambda _: None)
    assert_bit_equal({n: p.detach() for n, p in live.named_parameters()}, weights(tmp_path / "out"))

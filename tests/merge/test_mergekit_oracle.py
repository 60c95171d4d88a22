"""mergekit as the oracle: the same recipe through mergekit and through `optimizer.merge` gives the same
tensors (fp32, within 1e-5), for every registered method; random-mask methods are compared with their masks
off (density 1), since the two tools draw different random numbers. Needs the `oracle` extra (mergekit)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

from optimizer.config import MergeConfig
from optimizer.merge.registry import METHODS
from optimizer.merge.run_recipe import merge_recipe
from optimizer.space import SearchSpace, derive_layout

pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

GRADIENT = [{"filter": "self_attn", "value": [0.2, 0.9, 0.5]}, {"value": 0.7}]
DIFFS: dict[str, float] = {}  # recipe -> max abs diff, printed at the end (pytest -s)


def pair(a: dict, b: dict) -> list[dict]:
    return [{"model": "A", "parameters": a}, {"model": "B", "parameters": b}]


def gta(method: str, a: dict, b: dict, **params) -> dict:
    return {"merge_method": method, "base_model": "BASE", "models": pair(a, b), "parameters": params}


OFF = ({"weight": 0.7, "density": 1.0}, {"weight": [0.2, 0.9], "density": 1.0})  # random masks off
RECIPES = {
    "linear": {"merge_method": "linear",
               "models": pair({"weight": [0.3, 0.8]}, {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.4}]})},
    "linear/base_listed": {"merge_method": "linear", "base_model": "BASE",
                           "models": [{"model": "BASE", "parameters": {"weight": 0.5}}, *pair({"weight": 0.3},
                                                                                              {"weight": 0.2})]},
    "task_arithmetic": gta("task_arithmetic", {"weight": GRADIENT}, {"weight": [0.1, 1.2]}, **{"lambda": 0.9}),
    "slerp": {"merge_method": "slerp", "base_model": "BASE",
              "slices": [{"sources": [{"model": "BASE", "layer_range": [0, 3]}, {"model": "A", "layer_range": [0, 3]}]}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                   {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
    "ties": gta("ties", {"weight": [0.4, 1.0], "density": 0.5},
                {"weight": 0.8, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}, normalize=True),
    "ties/no_normalize": gta("ties", {"weight": 0.6, "density": 0.4}, {"weight": 0.8, "density": 0.6}, normalize=False),
    "breadcrumbs": gta("breadcrumbs", {"weight": 0.7, "density": 0.8, "gamma": 0.05},
                       {"weight": 0.5, "density": [0.6, 0.9]}, gamma=0.02),
    "breadcrumbs_ties": gta("breadcrumbs_ties", {"weight": 0.7, "density": 0.8, "gamma": 0.05},
                            {"weight": 0.5, "density": 0.7, "gamma": 0.1}, normalize=True),
    "model_stock": {"merge_method": "model_stock", "base_model": "BASE", "models": pair({}, {})},
    "model_stock/filter_wise": {"merge_method": "model_stock", "base_model": "BASE", "models": pair({}, {}),
                                "parameters": {"filter_wise": True}},
    "dare_ties/density_1": gta("dare_ties", *OFF),
    "dare_linear/density_1": gta("dare_linear", *OFF),
    "della/density_1": gta("della", *OFF, epsilon=0.1, **{"lambda": 1.1}),
    "della_linear/density_1": gta("della_linear", *OFF, epsilon=0.1, **{"lambda": 0.9}),
}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def with_paths(doc, tm):
    """Replace the placeholders BASE / A / B by the tiny models' folders."""
    names = {"BASE": str(tm["base"]), "A": str(tm["a"]), "B": str(tm["b"])}
    if isinstance(doc, dict):
        return {k: (names.get(v, v) if k in ("model", "base_model") else with_paths(v, tm)) for k, v in doc.items()}
    return [with_paths(e, tm) for e in doc] if isinstance(doc, list) else doc


def both(doc: dict, tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(mergekit's tensors, ours) for one recipe document."""
    doc = {**doc, "dtype": "float32"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    logging.disable(logging.WARNING)
    try:
        run_merge(MergeConfiguration.model_validate(doc), str(tmp_path / "mergekit"),
                  options=MergeOptions(quiet=True, write_model_card=False))
    finally:
        logging.disable(logging.NOTSET)
    merge_recipe(path, tmp_path / "ours", device="cpu", log=lambda _: None)
    return weights(tmp_path / "mergekit"), weights(tmp_path / "ours")


def max_diff(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> float:
    assert set(theirs) == set(ours)
    return max(float((theirs[k].double() - ours[k].double()).abs().max()) for k in ours)


def test_every_registered_method_has_an_oracle_recipe():
    assert {k.split("/")[0] for k in RECIPES} == set(METHODS)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_same_tensors_as_mergekit(name, tiny_models, tmp_path):
    theirs, ours = both(with_paths(RECIPES[name], tiny_models), tmp_path)
    DIFFS[name] = max_diff(theirs, ours)
    assert DIFFS[name] <= 1e-5


def plan_doc(method: str, tm) -> dict:
    """A layer-wise plan with distinct in-bounds values per unit, written as a recipe by MergePlan.to_mergekit."""
    from safetensors import safe_open

    with safe_open(str(tm["base"] / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    spec = METHODS[method]
    models = ["a", "b"][: spec.max_models or 2]
    space = SearchSpace(spec, models, derive_layout(names, "layer"),
                        OmegaConf.merge(OmegaConf.structured(MergeConfig), {"method": method}))
    values = {p.name: p.low + (p.high - p.low) * (0.3 + 0.1 * (i % 5)) for i, p in enumerate(space.params)}
    doc = space.plan(values).to_mergekit({m: str(tm[m]) for m in models}, str(tm["base"]), "float32",
                                         extension={"seed": 0, "trial": 0} if spec.stochastic else None)
    return doc


@pytest.mark.parametrize("method", sorted(METHODS))
def test_exported_recipes_run_in_mergekit(method, tiny_models, tmp_path):
    """What a study exports (MergePlan.to_mergekit) is a recipe mergekit runs; deterministic methods agree."""
    theirs, ours = both(plan_doc(method, tiny_models), tmp_path)
    if not METHODS[method].stochastic:
        DIFFS[f"exported {method}"] = max_diff(theirs, ours)
        assert DIFFS[f"exported {method}"] <= 1e-5


def test_report_differences():
    for name, d in sorted(DIFFS.items()):
        print(f"{name:32s} max |mergekit - ours| = {d:.3g}")

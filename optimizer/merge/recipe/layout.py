"""Which output tensor comes from which input tensors: a recipe's slices laid out against the checkpoints.

As mergekit's planner: the embeddings (and other tensors before the layers) come from the first slice's
sources at t = 0; each slice contributes ``length`` consecutive output layers, output layer L of a slice
taking layer ``start + offset`` of every source; the final norm and lm_head come from the last slice at
t = 0. The ``models:`` form is one slice over all layers. Each merged tensor has a reference input, the one
task vectors are taken against: the slice's base model, else (methods that do not need one) the first input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from optimizer import UserError
from optimizer.checkpoint import TensorInfo
from optimizer.merge.recipe.schema import Recipe, layer_fraction

_LAYER = re.compile(r"^(?P<prefix>.*?\.(?:layers|h|blocks)\.)(?P<idx>\d+)\.(?P<leaf>.+)$")


def layer_of(name: str) -> int | None:
    """Decoder layer index of a tensor (`....layers.<i>.`, `.h.<i>.`, `.blocks.<i>.`), None outside the layers."""
    m = _LAYER.match(name)
    return int(m["idx"]) if m else None


def _is_pre(name: str) -> bool:
    """Non-layer tensors that precede the layers (token and position embeddings)."""
    return "embed" in name or name.split(".")[-2:-1] in (["wte"], ["wpe"])


@dataclass(frozen=True)
class Tap:
    """One input tensor: the model (recipe reference) and the tensor's name in that model."""

    model: str
    name: str


@dataclass(frozen=True)
class Job:
    """One output tensor: where it comes from and at which t its parameters are read."""

    name: str
    slice: int
    t: float
    ref: Tap  # the task vectors' reference (also the source of non-float tensors)
    inputs: tuple[Tap, ...]  # the merged models, in the recipe's input order
    info: TensorInfo  # shape and dtype of the reference tensor


def num_layers(path: Path, names: Iterable[str]) -> int:
    """Decoder layers of a checkpoint: config.json's count, else the tensor names'."""
    try:
        n = json.loads((Path(path) / "config.json").read_text()).get("num_hidden_layers")
    except (OSError, ValueError):
        n = None
    return int(n) if n else max((i for t in names if (i := layer_of(t)) is not None), default=-1) + 1


def reference(recipe: Recipe, i: int, ext_base: str | None = None) -> str:
    """The model task vectors of slice ``i`` are taken against (UserError if the method needs a base that the
    slice lacks)."""
    base, method = recipe.base_of(i), recipe.method
    listed = [s.model for s in recipe.slices[i].sources]
    if recipe.form == "slices" and base and base not in listed and method.base != "ignored":
        raise UserError(f"slices[{i}] does not list base_model {base!r} among its sources; merge_method "
                        f"{method.name!r} merges each slice against its base, so add it with a layer_range.")
    if method.base == "ignored":
        return ext_base or base or recipe.inputs(i)[0]
    if base:
        return base
    if method.base == "required":
        raise UserError(f"merge_method {method.name!r} needs base_model (the task vectors are taken against it).")
    return recipe.inputs(i)[0]  # optional base and none given: the method works on the models' weights


def plan_jobs(recipe: Recipe, infos: Mapping[str, Mapping[str, TensorInfo]], layers: Mapping[str, int],
              anchor: str, ext_base: str | None = None) -> list[Job]:
    """Every output tensor, in output order (pre-layer tensors, layers, post-layer tensors).

    Args:
        recipe: the recipe.
        infos: model reference -> its tensor infos (from the headers).
        layers: model reference -> its number of decoder layers.
        anchor: the model whose non-layer tensors the output has.
        ext_base: the task vectors' reference of methods without a base (``merge_optimizer.base``).
    """
    refs = [reference(recipe, i, ext_base) for i in range(len(recipe.slices))]
    job = partial(_job, recipe, infos, refs)
    jobs = [job(0, n, n, None) for n in infos[anchor] if layer_of(n) is None and _is_pre(n)]
    out_layer = 0
    for i, sl in enumerate(recipe.slices):
        length = sl.length if sl.length is not None else layers[refs[i]]
        starts = {s.model: (s.layer_range or (0, length))[0] for s in sl.sources}
        for offset in range(length):
            src_layer = starts.get(refs[i], 0) + offset
            found = [(m["prefix"], m["leaf"]) for n in infos[refs[i]]
                     if (m := _LAYER.match(n)) and int(m["idx"]) == src_layer]
            if not found:
                raise UserError(f"slices[{i}]: model {refs[i]!r} has no layer {src_layer} (it has "
                                f"{layers[refs[i]]} layers).")
            for prefix, leaf in found:
                src = {m: f"{prefix}{start + offset}.{leaf}" for m, start in starts.items()}
                jobs.append(job(i, f"{prefix}{out_layer}.{leaf}", src, layer_fraction(offset, length)))
            out_layer += 1
    last = len(recipe.slices) - 1
    jobs += [job(last, n, n, None) for n in infos[anchor] if layer_of(n) is None and not _is_pre(n)]
    return jobs


def _job(recipe: Recipe, infos, refs, i: int, out: str, src: Any, t: float | None) -> Job:
    def tap(model: str) -> Tap:
        name = src if isinstance(src, str) else src.get(model, out)
        if name not in infos[model]:
            raise UserError(f"model {model!r} has no tensor {name!r}, which slice {i} of the recipe needs; "
                            "all models of a slice must share one architecture.")
        return Tap(model, name)

    ref = tap(refs[i])
    return Job(out, i, 0.0 if t is None else t, ref, tuple(tap(m) for m in recipe.inputs(i)),
               infos[ref.model][ref.name])


def output_config(config: dict[str, Any], jobs: list[Job], paths: Mapping[str, Path]) -> dict:
    """The anchor's config with the output's layer count, and per-layer lists (``layer_types``) taken from
    the config of each output layer's reference model."""
    by_layer = {layer_of(j.name): j.ref for j in jobs if layer_of(j.name) is not None}
    out = dict(config, num_hidden_layers=len(by_layer))
    if isinstance(config.get("layer_types"), list):
        configs = {m: json.loads((Path(p) / "config.json").read_text()) for m, p in paths.items()}
        out["layer_types"] = [configs[tap.model]["layer_types"][layer_of(tap.name)]
                              for _, tap in sorted(by_layer.items())]
    return out

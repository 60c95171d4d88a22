"""A recipe resolved against its checkpoints: models located and cross-checked from headers, parameter names
checked, the output laid out tensor by tensor, and each tensor's parameter values (filters, gradients,
defaults as mergekit).

Beyond mergekit's schema, the ``merge_optimizer`` key (which mergekit ignores) carries what a study needs to be
re-applied exactly: ``seed`` and ``trial`` of random masks, ``device`` (the type the masks were drawn on),
``target`` (chat vector: the anchor the task vectors are added to), ``base`` (the task vectors' reference of
methods that take no base_model, e.g. linear), ``rescale: inverse_density``, ``vocab_policy`` and
``precision`` (``storage``: compute in the storage dtype as mergekit) and ``kernels`` (``fused``: the study
merged with the compiled kernels of ``optimizer.merge.fused``, whose float32 rounding can differ from the
eager ones in the last bit). A top-level ``random_seed`` is read as the seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from optimizer import UserError
from optimizer.checkpoint import Checkpoint, locate
from optimizer.dtypes import parse_dtype
from optimizer.merge.recipe.layout import Job, num_layers, plan_jobs, reference
from optimizer.merge.recipe.schema import Recipe
from optimizer.merge.registry import MergeMethod
from optimizer.merge.tensor_ops import PRECISIONS
from optimizer.models import check_compatible, check_vocab_policy

MERGEKIT_EXTENSION = "merge_optimizer"  # top-level key mergekit's schema ignores; `python -m optimizer.merge` reads it
EXTENSION_KEYS = ("seed", "trial", "device", "target", "base", "rescale", "vocab_policy", "precision", "kernels")
KERNELS = ("eager", "fused")
_UNSUPPORTED_KEYS = {"tokenizer": "a 'tokenizer' section (vocabulary surgery)",
                     "chat_template": "'chat_template'"}


@dataclass
class Inputs:
    """A recipe resolved against its checkpoints: what to load, how to merge, how to seed."""

    recipe: Recipe
    method: MergeMethod
    ckpts: dict[str, Checkpoint]  # recipe model reference -> checkpoint
    anchor: Checkpoint  # whose config and tokenizer the output gets (the model the result is built on)
    target: Checkpoint | None  # chat-vector target (the `models:` form only)
    jobs: list[Job]
    dtype: torch.dtype
    out_dtype: torch.dtype
    seed: int
    trial: int
    rescale: str | None  # "inverse_density" from the extension key, else the recipe's rescale
    precision: str
    tokenizer: Path | None
    mask_device: str | None = None  # device type a study drew the random masks on
    kernels: str = "eager"  # "fused": the compiled one-pass kernels (optimizer.merge.fused)
    kernels_from_recipe: bool = False  # the choice came from the recipe, not the command line


def load_recipe(path: str | Path) -> tuple[Recipe, dict[str, Any]]:
    """Parse a recipe file (UserError with the reason for anything malformed or unsupported)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise UserError(f"cannot read recipe {str(path)!r}: {e.strerror or e}.") from None
    except yaml.YAMLError as e:
        raise UserError(f"recipe {str(path)!r} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(raw, Mapping):
        raise UserError(f"recipe {str(path)!r} must be a YAML mapping (merge_method, models, ...).")
    for key, what in _UNSUPPORTED_KEYS.items():
        if raw.get(key) is not None:
            raise UserError(f"recipe {str(path)!r} has {what}, which python -m optimizer.merge does not support; "
                            "remove it or use mergekit for this recipe.")
    try:
        return Recipe.from_dict(raw), dict(raw)
    except ValueError as e:
        raise UserError(f"recipe {str(path)!r}: {e}.") from None


def resolve(recipe: Recipe, raw: Mapping[str, Any], *, seed: int | None = None, trial: int | None = None,
            vocab_policy: str | None = None, allow_pickle: bool = False, precision: str | None = None,
            kernels: str | None = None) -> Inputs:
    """Locate and cross-check the recipe's models from their headers and lay out the output (nothing heavy is
    loaded).

    Args:
        recipe: the parsed recipe.
        raw: the recipe mapping (for the extension key, tokenizer_source, out_dtype).
        seed, trial: override the recipe's mask seed / trial number.
        vocab_policy: override the recipe's vocabulary policy ("error" or "truncate_to_base").
        allow_pickle: accept `.bin` checkpoints.
        precision: override the recipe's precision ("float32" or "storage").
        kernels: override the recipe's kernels ("eager" or "fused").
    """
    ext = _extension(raw)
    method = recipe.method
    for i in range(len(recipe.slices)):
        reference(recipe, i, ext.get("base"))  # UserError if a slice lacks the base its method needs
    _check_counts(recipe, method)
    refs = [recipe.base_model, *(sl.base_model for sl in recipe.slices), *recipe.models, ext.get("base")]
    ckpts: dict[str, Checkpoint] = {}
    for r in dict.fromkeys(x for x in refs if x):
        what = "base_model" if r in (recipe.base_model, ext.get("base")) else "model"
        ckpts[r] = Checkpoint(r, what=what, allow_pickle=allow_pickle)
    first = reference(recipe, 0, ext.get("base"))
    target = None
    if ext.get("target"):
        if recipe.form != "models":
            raise UserError(f"{MERGEKIT_EXTENSION}.target (chat vector) needs the `models:` form, not slices.")
        target = Checkpoint(ext["target"], what=f"{MERGEKIT_EXTENSION}.target", allow_pickle=allow_pickle)
    anchor = target or ckpts[recipe.base_model or first]
    policy = check_vocab_policy(vocab_policy or ext.get("vocab_policy") or "error", "vocab_policy")
    infos = {m: c.infos() for m, c in ckpts.items()}  # headers read once
    if recipe.form == "models":  # one architecture: every checkpoint has the reference's tensors and shapes
        for ckpt in [*ckpts.values(), *([target] if target else [])]:
            if ckpt is not ckpts[first]:
                check_compatible(infos[first], infos.get(ckpt.ref) or ckpt.infos(), ckpt.what, ckpt.ref, policy)
    layers = {m: num_layers(c.path, infos[m]) for m, c in ckpts.items()}
    jobs = plan_jobs(recipe, infos, layers, recipe.base_model or first, ext.get("base"))
    if recipe.form == "slices":
        _check_shapes(infos, jobs, policy)
    float_dtype = next(i.dtype for i in anchor.infos().values() if i.dtype.is_floating_point)
    dtype = parse_dtype(recipe.dtype or "auto", float_dtype)
    check_params(recipe, method)
    prec = precision or ext.get("precision") or "float32"
    if prec not in PRECISIONS:
        raise UserError(f"precision={prec!r} is unknown; use one of {list(PRECISIONS)}.")
    kern = kernels or ext.get("kernels") or "eager"
    if kern not in KERNELS:
        where = "--kernels" if kernels else f"recipe key {MERGEKIT_EXTENSION}.kernels"
        raise UserError(f"{where}={kern!r} is unknown; use one of {list(KERNELS)}.")
    return Inputs(recipe, method, ckpts, anchor, target, jobs, dtype,
                  parse_dtype(raw.get("out_dtype") or "auto", dtype),
                  seed=_int(seed, ext.get("seed"), raw.get("random_seed"), what="seed"),
                  trial=_int(trial, ext.get("trial"), what="trial"), rescale=ext.get("rescale"), precision=prec,
                  tokenizer=_tokenizer_source(raw.get("tokenizer_source"), anchor, ckpts, recipe.base_model),
                  mask_device=ext.get("device"), kernels=kern, kernels_from_recipe=kernels is None and "kernels" in ext)


def _check_counts(recipe: Recipe, method: MergeMethod) -> None:
    for i in range(len(recipe.slices)):
        models = list(recipe.inputs(i))
        n = len(models)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            most = f"at most {method.max_models}" if method.max_models is not None else "any number of"
            where = "the recipe has" if recipe.form == "models" else f"slices[{i}] has"
            raise UserError(f"merge_method {method.name!r} takes at least {method.min_models} and {most} models "
                            f"besides base_model; {where} {n}: {models}.")


def _check_shapes(infos: Mapping[str, Mapping[str, Any]], jobs: list[Job], policy: str) -> None:
    """Slices: every input of a merged tensor has the reference's shape (vocabulary rows as the policy says)."""
    for job in jobs:
        for tap in job.inputs:
            info = infos[tap.model][tap.name]
            check_compatible({job.name: job.info}, {job.name: info}, f"model (as {tap.name!r})", tap.model, policy)


def _extension(raw: Mapping[str, Any]) -> dict[str, Any]:
    ext = raw.get(MERGEKIT_EXTENSION) or {}
    if not isinstance(ext, Mapping):
        raise UserError(f"recipe key {MERGEKIT_EXTENSION!r} must be a mapping with keys {list(EXTENSION_KEYS)}.")
    unknown = sorted(set(ext) - set(EXTENSION_KEYS))
    if unknown:
        raise UserError(f"recipe key {MERGEKIT_EXTENSION}.{unknown[0]} is unknown; it takes {list(EXTENSION_KEYS)}.")
    if ext.get("rescale") not in (None, "inverse_density"):
        raise UserError(f"{MERGEKIT_EXTENSION}.rescale={ext['rescale']!r}: only 'inverse_density' goes here; "
                        "state other rescale modes as mergekit's boolean parameters.rescale.")
    return dict(ext)


def _int(*values: Any, what: str) -> int:
    """The first value that is set, as an int (0 if none is)."""
    v = next((x for x in values if x is not None), 0)
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{what}={v!r} must be an integer.")
    return v


def _tokenizer_source(source: Any, anchor: Checkpoint, ckpts: Mapping[str, Checkpoint],
                      base: str | None) -> Path | None:
    if source is None:
        return anchor.path  # as mergekit: the tokenizer of the model the result is built on
    if source == "union":
        raise UserError("tokenizer_source: union (vocabulary union with embedding surgery) is not supported; "
                        "use 'base' or a model reference.")
    if source == "base":
        return ckpts[base].path if base else anchor.path
    return locate(str(source), what="tokenizer_source")


def check_params(recipe: Recipe, method: MergeMethod) -> None:
    """Reject parameter names the method cannot use (mergekit ignores them silently: a typo would pass)."""
    allowed = {p.name for p in method.params} | set(method.ignored_params)
    levels = [("parameters", recipe.params)]
    for i, sl in enumerate(recipe.slices):
        where = "" if recipe.form == "models" else f" of slices[{i}]"
        levels += [(f"slice parameters{where}", sl.params)] if sl.params else []
        levels += [(f"parameters of {s.model}{where}", s.params) for s in sl.sources]
    for where, params in levels:
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise UserError(f"recipe {where}: {unknown[0]!r} is not a parameter of {method.name!r}; it takes "
                            f"{sorted(allowed - set(method.ignored_params))}.")


def tensor_params(inp: Inputs, job: Job) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Per-model and global parameter values of one output tensor, range-checked (UserError naming it)."""
    r, i, t = inp.recipe, job.slice, job.t
    try:
        mp = {p.name: [r.value(i, tap.model, p.name, tap.name, t) for tap in job.inputs]
              for p in inp.method.model_params}
        gp: dict[str, Any] = {}
        for p in inp.method.global_params:
            if p.name == "epsilon" and inp.method.stochastic:  # DELLA: per model in mergekit, one per tensor here
                values = {r.value(i, tap.model, "epsilon", tap.name, t) for tap in job.inputs}
                if len(values) > 1:
                    raise ValueError(f"models give different epsilon values {sorted(values)}; this kernel "
                                     "takes one epsilon per tensor")
                gp["epsilon"] = values.pop()
            else:
                gp[p.name] = r.value(i, None, p.name, job.name, t)
        if inp.rescale:
            gp["rescale"] = inp.rescale
        if inp.precision != "float32":
            gp["precision"] = inp.precision
        if inp.method.base == "optional" and not r.base_of(i):
            gp["on_weights"] = True
        for p in inp.method.params:
            for v in mp.get(p.name, [gp.get(p.name)]):
                if not isinstance(v, str):
                    p.check(float(v))
    except ValueError as e:
        raise UserError(f"recipe value for tensor {job.name!r}: {e}.") from None
    return mp, gp

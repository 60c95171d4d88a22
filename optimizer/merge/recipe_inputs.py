"""A mergekit-style recipe resolved against its checkpoints: models located and cross-checked from headers,
parameter names checked, and each tensor's parameter values (filters, gradients, defaults as mergekit).

Beyond mergekit's schema, the ``merge_optimizer`` key (which mergekit ignores) carries what a study needs to be
re-applied exactly: ``seed`` and ``trial`` of random masks, ``device`` (the type the masks were drawn on),
``target`` (chat vector: the anchor the task vectors are added to), ``base`` (linear's task-vector
reference), ``rescale: inverse_density`` and ``vocab_policy``. A top-level ``random_seed`` is read as the seed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from optimizer import UserError
from optimizer.checkpoint import Checkpoint, locate
from optimizer.merge.recipe import Recipe
from optimizer.merge.registry import LAMBDA, MergeMethod, get_method
from optimizer.models import check_compatible, check_vocab_policy, parse_dtype
from optimizer.plan import MERGEKIT_EXTENSION

_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
_EXTENSION_KEYS = ("seed", "trial", "device", "target", "base", "rescale", "vocab_policy")
# mergekit lets every generalized-task-arithmetic method take `lambda`; the registry declares it only where
# it is searched (DELLA), and the task-arithmetic kernel honours it for all presets.
_LAMBDA_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties")
_IGNORED_PARAMS = ("int8_mask",)  # mergekit memory options with no effect on the result
_UNSUPPORTED_KEYS = {"tokenizer": "a 'tokenizer' section (vocabulary surgery)",
                     "chat_template": "'chat_template'"}


@dataclass
class Inputs:
    """A recipe resolved against its checkpoints: what to load, how to merge, how to seed."""

    recipe: Recipe
    method: MergeMethod
    base: Checkpoint
    target: Checkpoint  # the anchor the result is built on (base unless chat-vector `target`)
    experts: list[Checkpoint]  # in recipe order; linear may include the base itself (zero task vector)
    dtype: torch.dtype
    out_dtype: torch.dtype
    seed: int
    trial: int
    rescale: str | None  # "inverse_density" from the extension key, else the recipe's rescale
    tokenizer: Path | None
    mask_device: str | None = None  # device type a study drew the random masks on


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
        recipe = Recipe.from_dict(raw)
        if recipe.merge_method == "linear" and (recipe.base_listed or not recipe.base_model):
            # linear averages every listed model, the base too: make it a model with a zero task vector
            recipe = Recipe.from_dict({**raw, "base_model": None})
    except ValueError as e:
        raise UserError(f"recipe {str(path)!r}: {e}.") from None
    return recipe, dict(raw)


def resolve(recipe: Recipe, raw: Mapping[str, Any], *, seed: int | None = None, trial: int | None = None,
            vocab_policy: str | None = None, allow_pickle: bool = False) -> Inputs:
    """Locate and cross-check the recipe's models from their headers (nothing heavy is loaded).

    Args:
        recipe: the parsed recipe.
        raw: the recipe mapping (for the extension key, tokenizer_source, out_dtype).
        seed, trial: override the recipe's mask seed / trial number.
        vocab_policy: override the recipe's vocabulary policy ("error" or "truncate_to_base").
        allow_pickle: accept `.bin` checkpoints.
    """
    ext = _extension(raw)
    method = get_method(recipe.merge_method)
    models = list(recipe.models)
    n = len(models)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        most = f"at most {method.max_models}" if method.max_models is not None else "any number of"
        raise UserError(f"merge_method {method.name!r} takes at least {method.min_models} and {most} models "
                        f"besides base_model; the recipe has {n}: {models}.")
    # linear: the task vectors' reference may be a listed model, a study's base (extension key) or none
    base_ref = recipe.base_model or ext.get("base") or models[0]
    if not recipe.base_model and method.name != "linear":
        raise UserError(f"merge_method {method.name!r} needs base_model (the task vectors are taken against it).")
    base = Checkpoint(base_ref, what="base_model", allow_pickle=allow_pickle)
    experts = [base if m == base_ref else Checkpoint(m, what="model", allow_pickle=allow_pickle) for m in models]
    target = (Checkpoint(ext["target"], what="merge_optimizer.target", allow_pickle=allow_pickle)
              if ext.get("target") else base)
    policy = check_vocab_policy(vocab_policy or ext.get("vocab_policy") or "error", "vocab_policy")
    infos = base.infos()
    for ckpt in {id(c): c for c in [*experts, target] if c is not base}.values():
        check_compatible(infos, ckpt.infos(), ckpt.what, ckpt.ref, policy)
    first = next(i.dtype for i in infos.values() if i.dtype.is_floating_point)
    dtype = parse_dtype(recipe.dtype or "auto", first)
    out_dtype = parse_dtype(raw.get("out_dtype") or "auto", dtype)
    check_params(recipe, method)
    return Inputs(recipe, method, base, target, experts, dtype, out_dtype,
                  seed=_int(seed, ext.get("seed"), raw.get("random_seed"), what="seed"),
                  trial=_int(trial, ext.get("trial"), what="trial"),
                  rescale=ext.get("rescale"), tokenizer=_tokenizer_source(raw.get("tokenizer_source"), target, base),
                  mask_device=ext.get("device"))


def _extension(raw: Mapping[str, Any]) -> dict[str, Any]:
    ext = raw.get(MERGEKIT_EXTENSION) or {}
    if not isinstance(ext, Mapping):
        raise UserError(f"recipe key {MERGEKIT_EXTENSION!r} must be a mapping with keys {list(_EXTENSION_KEYS)}.")
    unknown = sorted(set(ext) - set(_EXTENSION_KEYS))
    if unknown:
        raise UserError(f"recipe key {MERGEKIT_EXTENSION}.{unknown[0]} is unknown; it takes {list(_EXTENSION_KEYS)}.")
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


def _tokenizer_source(source: Any, target: Checkpoint, base: Checkpoint) -> Path | None:
    if source is None:
        return target.path  # as mergekit: the tokenizer of the model the result is built on
    if source == "union":
        raise UserError("tokenizer_source: union (vocabulary union with embedding surgery) is not supported; "
                        "use 'base' or a model reference.")
    return base.path if source == "base" else locate(str(source), what="tokenizer_source")


def check_params(recipe: Recipe, method: MergeMethod) -> None:
    """Reject parameter names the method cannot use (mergekit ignores them silently: a typo would pass)."""
    allowed = {p.name for p in method.params} | set(_IGNORED_PARAMS)
    if method.name in _LAMBDA_METHODS:
        allowed.add("lambda")
    levels = [("parameters", recipe.params), ("slice parameters", recipe.slice_params)]
    levels += [(f"parameters of {m}", p) for m, p in recipe.model_params.items()]
    for where, params in levels:
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise UserError(f"recipe {where}: {unknown[0]!r} is not a parameter of {method.name!r}; it takes "
                            f"{sorted(allowed - set(_IGNORED_PARAMS))}.")


def tensor_params(inp: Inputs, name: str, layer: int | None,
                  n_layers: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Per-model and global parameter values of one tensor, range-checked (UserError naming the tensor)."""
    r, models = inp.recipe, inp.recipe.models
    try:
        mp = {p.name: [r.value(m, p.name, name, layer, n_layers) for m in models] for p in inp.method.model_params}
        gp: dict[str, Any] = {}
        for p in inp.method.global_params:
            if p.name == "epsilon":  # per model in mergekit, one per tensor in our kernel
                values = {r.value(m, "epsilon", name, layer, n_layers) for m in models}
                if len(values) > 1:
                    raise ValueError(f"models give different epsilon values {sorted(values)}; this kernel "
                                     "takes one epsilon per tensor")
                gp["epsilon"] = values.pop()
            else:
                gp[p.name] = r.value(None, p.name, name, layer, n_layers)
        if inp.method.name in _LAMBDA_METHODS:
            lam = r.value(None, "lambda", name, layer, n_layers, default=None)
            if lam is not None:
                LAMBDA.check(float(lam))
                gp["lambda"] = lam
        if inp.rescale:
            gp["rescale"] = inp.rescale
        for p in inp.method.params:
            for v in mp.get(p.name, [gp.get(p.name)]):
                if not isinstance(v, str):
                    p.check(float(v))
    except ValueError as e:
        raise UserError(f"recipe value for tensor {name!r}: {e}.") from None
    return mp, gp


def layer_of(name: str) -> int | None:
    """Decoder layer index of a tensor (`....layers.<i>.`, `.h.<i>.`, `.blocks.<i>.`), None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None

"""A MergePlan (what a trial decided) written as a mergekit recipe, and the YAML text a study exports.

Values take mergekit's types from the registry (``ParamSpec.kind``: booleans for normalize, filter_wise, ...).
What mergekit cannot state goes under the ``merge_optimizer`` key, which mergekit ignores and
``python -m optimizer.merge`` reads, so that a trial re-applies bit for bit: the seed, trial number and device
type of random masks, a chat-vector target, the task vectors' reference of methods that take no base_model
(linear, karcher, passthrough), rescale 2 (divide by the keep probability: mergekit's nearest, its L1
rescale, is what the ``rescale`` parameter says) and a non-default vocabulary policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from optimizer.checkpoint import locate
from optimizer.dtypes import dtype_name
from optimizer.merge import fused
from optimizer.merge.recipe.inputs import MERGEKIT_EXTENSION
from optimizer.merge.registry import METHODS

if TYPE_CHECKING:
    from optimizer.plan import MergePlan, Rules
    from optimizer.session import Session

EXTENSION_NOTES = {
    "seed": "seed, trial, device: random masks (DARE/DELLA) are drawn per tensor from seed_for(seed, trial, "
            "tensor name) on that device type; mergekit draws its own (same method, other draws)",
    "rescale": "rescale: inverse_density divides kept entries by their keep probability (the papers); "
               "mergekit has no equivalent and applies its L1 rescale (rescale: true) instead",
    "target": "target: the task vectors are added to this model (chat vector), not to base_model as mergekit does",
    "vocab_policy": "vocab_policy: vocabularies differ; task vectors cover the rows shared with the base",
    "base": "base: the task vectors' reference; this method takes no base_model in mergekit (same result up to "
            "float rounding)",
    "precision": "precision: storage computes in the storage dtype, as mergekit does",
}


def plan_doc(plan: MergePlan, sources: Mapping[str, str], base_model: str, dtype: str | None = None,
             extension: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A mergekit recipe document (as a dict) that states ``plan``.

    Args:
        plan: the merge plan.
        sources: model name -> the reference mergekit should load (path or hub id).
        base_model: reference of the base model.
        dtype: dtype name for mergekit (`float32`, `bfloat16`, ...).
        extension: extra entries for the `merge_optimizer` key (e.g. seed and trial of random masks).
    """
    method = METHODS[plan.method]
    specs = {p.name: p for p in method.params}
    models = [{"model": sources[m], "parameters": {p: _value(specs.get(p), by[m]) for p, by in
                                                     plan.model_params.items()}} for m in plan.models]
    doc: dict[str, Any] = {"merge_method": plan.method, "base_model": base_model, "models": models}
    ext = dict(extension or {})
    if method.base == "ignored" and "target" not in ext:
        # the base is only the task vectors' reference here; mergekit would merge a base_model as one more model
        del doc["base_model"]
        ext["base"] = base_model
    gparams = {p: _value(specs.get(p), r) for p, r in plan.global_params.items()}
    gparams.update(plan.options)
    if "rescale" in gparams:
        gparams["rescale"], inverse = _rescale(gparams["rescale"])
        if inverse:
            ext["rescale"] = "inverse_density"
    if "precision" in gparams:
        ext["precision"] = gparams.pop("precision")
    if gparams:
        doc["parameters"] = gparams
    if dtype:
        doc["dtype"] = dtype
    if ext:
        doc[MERGEKIT_EXTENSION] = ext
    return doc


def _value(spec: Any, rules: Rules) -> Any:
    """A scalar, or a list of {filter, value} with a final default entry, in mergekit's type (rescale 2 stays
    numeric here and is rewritten by ``_rescale``)."""
    def conv(v: float) -> Any:
        if spec is None or (spec.name == "rescale" and v > 1.5):
            return v
        return spec.to_mergekit(v)

    if len(rules) == 1 and rules[0][0] is None:
        return conv(rules[0][1])
    return [{"value": conv(v)} if f is None else {"filter": f, "value": conv(v)} for f, v in rules]


def _rescale(value: Any) -> tuple[Any, bool]:
    """(mergekit's value of a `rescale` setting, whether it asks for inverse-density rescaling)."""
    named = {"none": False, "l1": True}
    values = [e["value"] for e in value] if isinstance(value, list) else [value]
    ours = [v for v in values if not isinstance(v, bool) and v not in named]  # 2 / "inverse_density"
    if not ours:
        if isinstance(value, list):
            return [e | {"value": named.get(e["value"], e["value"])} for e in value], False
        return named.get(value, value), False
    if len(ours) != len(values):
        raise ValueError(f"rescale rules {values} mix inverse-density with other modes; mergekit cannot state that")
    return True, True


def mergekit_ref(ref: str, path: Path) -> str:
    """How a recipe names a model: hub ids as they are; zoo models and local folders as absolute paths, so
    that mergekit can open them and the recipe works from any directory."""
    local = ref.startswith("zoo://") or Path(ref).expanduser().is_dir()
    return str(Path(path).resolve()) if local else ref


def recipe_doc(s: Session, plan: MergePlan, trial: int | None = None) -> dict[str, Any]:
    """A study's plan as a mergekit document, with model references mergekit can open and the
    ``merge_optimizer`` entries that make ``python -m optimizer.merge recipe.yaml OUT`` reproduce the trial.

    Args:
        s: the run session (models, cfg, device).
        plan: the trial's merge plan.
        trial: trial number (needed for stochastic methods).
    """
    m = s.models

    def ref(ckpt: Any) -> str:
        return mergekit_ref(ckpt.ref, ckpt.path)

    ext: dict[str, Any] = {}
    if METHODS[plan.method].stochastic:
        ext.update(seed=int(s.cfg.seed), trial=int(trial or 0), device=s.device.type)
    if m.target is not m.base:
        ext["target"] = ref(m.target)
    if m.vocab_policy != "error":
        ext["vocab_policy"] = m.vocab_policy
    if fused.enabled():  # the trial was merged with the compiled kernels: re-apply it with them, bit for bit
        ext["kernels"] = "fused"
    doc = plan_doc(plan, {name: ref(c) for name, c in m.experts.items()}, ref(m.base),
                   dtype_name(m.dtype), extension=ext)
    if getattr(s.cfg.models, "tokenizer", None):
        tok = s.cfg.models.tokenizer
        doc["tokenizer_source"] = mergekit_ref(tok, locate(tok, what="models.tokenizer"))
    return doc


def dump_recipe(doc: Mapping[str, Any], header: str = "") -> str:
    """YAML text of a recipe document: ``header`` and notes on the ``merge_optimizer`` key as comments, and
    a note when mergekit does not implement the method."""
    lines = header.splitlines()
    method = METHODS.get(doc.get("merge_method", ""))
    if method is not None and not method.mergekit:
        lines.append(f"merge_method {method.name} is merge-optimizer's ({method.paper}); mergekit does not "
                     "implement it: apply with `python -m optimizer.merge`.")
    ext = doc.get(MERGEKIT_EXTENSION) or {}
    if ext:
        lines.append(f"{MERGEKIT_EXTENSION}: read by `python -m optimizer.merge` (exact re-application), "
                     "ignored by mergekit:")
        lines += [f"  {note}" for key, note in EXTENSION_NOTES.items() if key in ext]
    body = yaml.safe_dump(dict(doc), sort_keys=False, allow_unicode=True)
    return "".join(f"# {line}\n" for line in lines) + body

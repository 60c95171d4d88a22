"""mergekit-style YAML recipes as frozen data: read, query per tensor, write back. No model loading.

Both mergekit forms are read: ``models:`` lists and a single ``slices:`` entry whose sources all cover the
same full layer range (the classic SLERP recipe). Parameter values follow mergekit's ``evaluate_setting``:

- scalar; numeric list = gradient: evenly spaced anchors, linearly interpolated at t = layer / (layers - 1);
- non-numeric list: the anchor at ``int(t * (len - 1))``;
- list of ``{filter, value}``: the first entry whose filter is absent, ``*`` or a substring of the tensor name
  (the value may itself be a gradient); no match falls through to the next level.

Lookup order (as mergekit): the model's own parameters, then the slice's, then the top-level ones, then
mergekit's default for the parameter. Non-layer tensors (embeddings, final norm, lm_head) use t = 0, i.e. the
*first* gradient value: mergekit's planner reads both pre- and post-layer weights with a ConfigReader at t=0
(mergekit 0.1.4 and 0.1.5; tests/merge/test_mergekit_oracle.py checks the installed mergekit).

Example:
    >>> r = Recipe.from_dict({"merge_method": "slerp", "base_model": "a",
    ...     "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 4]}]}],
    ...     "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]}})
    >>> r.value(None, "t", "model.layers.1.self_attn.q_proj.weight", 1, 4)
    0.3333333333333333
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from optimizer.merge.registry import get_method

Setting = Any  # scalar | tuple of scalars (gradient) | tuple[Condition, ...]
_MISSING = object()
# mergekit's defaults where a recipe omits a parameter (our registry defaults are recommended search values)
MERGEKIT_DEFAULTS = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15, "lambda": 1.0, "filter_wise": 0.0}


@dataclass(frozen=True)
class Condition:
    """One ``{filter, value}`` entry of a conditional parameter list."""

    value: Setting
    filter: str | None = None

    def matches(self, tensor_name: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in tensor_name


def _freeze(setting: Any, where: str) -> Setting:
    """YAML value -> hashable Setting (lists become tuples; dict entries become Conditions)."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, Mapping):
        if "value" not in setting:
            raise ValueError(f"{where}: a conditional parameter needs 'value' (got keys {sorted(setting)})")
        return (Condition(_freeze(setting["value"], where), setting.get("filter")),)
    if isinstance(setting, (list, tuple)) and setting:
        if all(isinstance(e, Mapping) for e in setting):
            return tuple(c for e in setting for c in _freeze(e, where))
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return tuple(setting)
    raise ValueError(f"{where}: unsupported parameter value {setting!r}")


def _thaw(setting: Setting) -> Any:
    if isinstance(setting, tuple) and setting and isinstance(setting[0], Condition):
        return [({"filter": c.filter} if c.filter is not None else {}) | {"value": _thaw(c.value)} for c in setting]
    return list(setting) if isinstance(setting, tuple) else setting


def evaluate(setting: Setting, tensor_name: str, t: float) -> Any:
    """mergekit's ``evaluate_setting``: the value of ``setting`` for one tensor at layer fraction ``t``
    (None when no conditional entry matches)."""
    if not isinstance(setting, tuple):
        return setting
    if setting and isinstance(setting[0], Condition):
        for cond in setting:
            if cond.matches(tensor_name):
                return evaluate(cond.value, tensor_name, t)
        return None
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting[int(t * (len(setting) - 1))]


def layer_fraction(tensor_name: str, layer_index: int | None, num_layers: int) -> float:
    """mergekit's t: index / (layers - 1) in a layer (1 for a single layer); 0 outside the layers
    (embeddings, final norm, lm_head)."""
    if layer_index is not None:
        return layer_index / (num_layers - 1) if num_layers > 1 else 1.0
    return 0.0


def _params(raw: Any, where: str) -> Mapping[str, Setting]:
    if raw is None:
        return MappingProxyType({})
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: 'parameters' must be a mapping, got {type(raw).__name__}")
    return MappingProxyType({str(k): _freeze(v, f"{where}.{k}") for k, v in raw.items()})


@dataclass(frozen=True)
class Recipe:
    """A mergekit merge recipe. ``models`` excludes the base model; ``model_params[m]`` are model m's
    parameters; ``slice_params`` those of the single slice (slices form); ``params`` the top-level ones."""

    merge_method: str
    models: tuple[str, ...]
    base_model: str | None = None
    model_params: Mapping[str, Mapping[str, Setting]] = field(default_factory=lambda: MappingProxyType({}))
    params: Mapping[str, Setting] = field(default_factory=lambda: MappingProxyType({}))
    slice_params: Mapping[str, Setting] = field(default_factory=lambda: MappingProxyType({}))
    dtype: str | None = None
    layer_range: tuple[int, int] | None = None  # set for the slices form
    base_listed: bool = False  # whether the base appears among the sources (kept when writing back)
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # other top-level keys

    def value(self, model: str | None, param: str, tensor_name: str, layer_index: int | None,
              num_layers: int, default: Any = _MISSING) -> Any:
        """The value of ``param`` for ``model`` (None: a global parameter) at one tensor.

        Args:
            model: a model of ``models``, or None for method-level parameters (t, normalize, lambda, ...).
            param: parameter name.
            tensor_name: e.g. "model.layers.3.mlp.up_proj.weight".
            layer_index: decoder layer of the tensor, None for embeddings / final norm / lm_head.
            num_layers: decoder layers of the model.
            default: returned when the recipe does not set it (else mergekit's default, else ValueError).

        Booleans come back as 0.0 / 1.0 and numbers as float; strings are returned as they are.
        """
        if self.layer_range is not None and self.layer_range != (0, num_layers):
            raise ValueError(f"recipe slices cover layers {list(self.layer_range)} but the model has {num_layers}; "
                             "only full layer ranges are supported")
        if model is not None and model not in self.models:
            raise ValueError(f"no model {model!r} in the recipe; models are {list(self.models)}")
        t = layer_fraction(tensor_name, layer_index, num_layers)
        levels = ([self.model_params.get(model, {})] if model is not None else []) + [self.slice_params, self.params]
        for level in levels:
            if param in level:
                v = evaluate(level[param], tensor_name, t)
                if v is not None:
                    return float(v) if isinstance(v, (bool, int, float)) else v
        if default is not _MISSING:
            return default
        if param in MERGEKIT_DEFAULTS:
            return MERGEKIT_DEFAULTS[param]
        method = get_method(self.merge_method)
        if param in ("normalize", "rescale") and param in {p.name for p in method.params}:
            return method.param(param).default  # registry presets carry mergekit's per-method defaults
        raise ValueError(f"recipe sets no {param!r}" + (f" for model {model!r}" if model else "")
                         + f" at {tensor_name!r} and mergekit has no default for it")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """Parse a mergekit config mapping (ValueError with the reason for anything unsupported)."""
        if "merge_method" not in d:
            raise ValueError("recipe has no merge_method")
        get_method(d["merge_method"])  # ValueError naming the known methods
        if d.get("modules"):
            raise ValueError("recipes with 'modules' are not supported; use 'models' or one 'slices' entry")
        if bool(d.get("models")) == bool(d.get("slices")):
            raise ValueError("a recipe needs exactly one of 'models' or 'slices'")
        base = d.get("base_model")
        known = {"merge_method", "base_model", "models", "slices", "parameters", "dtype"}
        fields = dict(merge_method=d["merge_method"], base_model=base, dtype=d.get("dtype"),
                      params=_params(d.get("parameters"), "parameters"),
                      extra=MappingProxyType({k: v for k, v in d.items() if k not in known}))
        sources, layer_range, slice_params = _sources(d)
        models = tuple(s["model"] for s in sources if s["model"] != base)
        if len(set(models)) != len(models):
            raise ValueError(f"a model appears twice in the recipe: {list(models)}")
        per_model = {s["model"]: _params(s.get("parameters"), f"{s['model']}.parameters")
                     for s in sources if s["model"] != base}
        return cls(models=models, model_params=MappingProxyType(per_model), slice_params=slice_params,
                   layer_range=layer_range, base_listed=any(s["model"] == base for s in sources), **fields)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a YAML recipe file."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(yaml.safe_load(f) or {})

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a mergekit config mapping, in the form it was read."""
        def entry(m: str, key: str = "model") -> dict[str, Any]:
            e: dict[str, Any] = {key: m}
            if self.layer_range is not None:
                e["layer_range"] = list(self.layer_range)
            if self.model_params.get(m):
                e["parameters"] = {k: _thaw(v) for k, v in self.model_params[m].items()}
            return e
        sources = ([entry(self.base_model)] if self.base_listed and self.base_model else []) + [
            entry(m) for m in self.models]
        out: dict[str, Any] = {}
        if self.layer_range is None:
            out["models"] = sources
        else:
            out["slices"] = [{"sources": sources} | (
                {"parameters": {k: _thaw(v) for k, v in self.slice_params.items()}} if self.slice_params else {})]
        out["merge_method"] = self.merge_method
        if self.base_model:
            out["base_model"] = self.base_model
        if self.params:
            out["parameters"] = {k: _thaw(v) for k, v in self.params.items()}
        if self.dtype:
            out["dtype"] = self.dtype
        return out | dict(self.extra)

    def dump(self, path: str | Path | None = None) -> str:
        """YAML text of the recipe (numeric lists in flow style, as mergekit writes them); written to
        ``path`` if given."""
        text = yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def _sources(d: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], tuple[int, int] | None, Mapping]:
    """Source entries, the common layer range (slices form) and the slice's parameters."""
    if d.get("models"):
        for m in d["models"]:
            if not isinstance(m, Mapping) or "model" not in m:
                raise ValueError(f"each 'models' entry needs a 'model' key, got {m!r}")
        return list(d["models"]), None, MappingProxyType({})
    slices = d["slices"]
    if len(slices) != 1:
        raise ValueError(f"recipes with {len(slices)} slices (frankenmerges) are not supported yet; "
                         "use one slice covering all layers")
    sl = slices[0]
    if sl.get("base_model") not in (None, d.get("base_model")):
        raise ValueError("a slice-level base_model different from the recipe's is not supported")
    ranges = {tuple(s.get("layer_range") or ()) for s in sl.get("sources", [])}
    if len(ranges) != 1 or len(next(iter(ranges))) != 2 or next(iter(ranges))[0] != 0:
        raise ValueError(f"all slice sources must share one layer_range starting at 0, got {sorted(ranges)}")
    return list(sl["sources"]), tuple(int(x) for x in next(iter(ranges))), _params(sl.get("parameters"),
                                                                                   "slices[0].parameters")


class _Dumper(yaml.SafeDumper):
    def represent_list(self, data):
        flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _Dumper.represent_list)
_Dumper.add_representer(MappingProxyType, lambda d, m: d.represent_dict(dict(m)))

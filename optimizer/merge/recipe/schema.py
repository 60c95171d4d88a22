"""mergekit YAML recipes as frozen data: read, query per tensor, write back as read. No model loading.

Both mergekit forms are read: ``models:`` (one implicit slice over all layers) and ``slices:`` of any layer
ranges from any models (frankenmerges; several sources per slice for the other methods). Parameter values
follow mergekit's ``evaluate_setting``:

- scalar; numeric list = gradient: evenly spaced anchors, linearly interpolated at the layer's t;
- non-numeric list: the anchor at ``int(t * (len - 1))``;
- list of ``{filter, value}``: the first entry whose filter is absent, ``*`` or a substring of the tensor name
  (the value may itself be a gradient); no match falls through to the next level.

t is ``offset / (length - 1)`` inside a slice (1 for a one-layer slice) and 0 outside the layers (embeddings,
final norm, lm_head, which mergekit plans at t = 0 from the first / last slice). Lookup order (as mergekit):
the source's own parameters (filters matched on its input tensor name), then the slice's, then the top-level
ones (filters matched on the output name), then mergekit's default (``ParamSpec.mergekit_default``).

Example:
    >>> r = Recipe.from_dict({"merge_method": "slerp", "base_model": "a",
    ...     "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 4]}]}],
    ...     "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]}})
    >>> r.value(0, None, "t", "model.layers.1.self_attn.q_proj.weight", layer_fraction(1, 4))
    0.3333333333333333
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from optimizer.merge.recipe.settings import Condition, Setting, evaluate, freeze, layer_fraction, thaw
from optimizer.merge.registry import MergeMethod, get_method

__all__ = ["Condition", "Recipe", "Setting", "Slice", "Source", "evaluate", "layer_fraction"]
_MISSING = object()
_EMPTY: Mapping[str, Setting] = MappingProxyType({})


def _empty() -> Mapping[str, Setting]:
    return _EMPTY


def _params(raw: Any, where: str) -> Mapping[str, Setting]:
    if raw is None:
        return _EMPTY
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: 'parameters' must be a mapping, got {type(raw).__name__}")
    return MappingProxyType({str(k): freeze(v, f"{where}.{k}") for k, v in raw.items()})


@dataclass(frozen=True)
class Source:
    """One input of a slice: a model, its layer range (None: all layers, the ``models:`` form), parameters."""

    model: str
    params: Mapping[str, Setting] = field(default_factory=_empty)
    layer_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class Slice:
    """Consecutive output layers merged from the same offsets of each source's layer range."""

    sources: tuple[Source, ...]
    params: Mapping[str, Setting] = field(default_factory=_empty)
    base_model: str | None = None  # slice-level override of the recipe's base_model

    @property
    def length(self) -> int | None:
        r = self.sources[0].layer_range
        return None if r is None else r[1] - r[0]


@dataclass(frozen=True)
class Recipe:
    """A mergekit merge recipe. ``form`` is the form it was read in ("models" or "slices"); the models form
    is one slice whose sources have no layer range."""

    merge_method: str
    slices: tuple[Slice, ...]
    base_model: str | None = None
    params: Mapping[str, Setting] = field(default_factory=_empty)
    dtype: str | None = None
    form: str = "models"
    extra: Mapping[str, Any] = field(default_factory=_empty)  # other top-level keys

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def base_of(self, i: int) -> str | None:
        """The base model of slice ``i`` (its own base_model, else the recipe's)."""
        return self.slices[i].base_model or self.base_model

    def inputs(self, i: int) -> tuple[str, ...]:
        """The models slice ``i`` merges, in source order. Without the base, except for methods that ignore
        it (linear, karcher, passthrough: mergekit merges a base_model like any input, and adds it to a
        ``models:`` list that does not name it)."""
        listed = tuple(s.model for s in self.slices[i].sources)
        base = self.base_of(i)
        if self.method.base != "ignored":
            return tuple(m for m in listed if m != base)
        if self.form == "models" and base and base not in listed:
            return (*listed, base)
        return listed

    @property
    def models(self) -> tuple[str, ...]:
        """Every merged model of every slice, first appearance first."""
        return tuple(dict.fromkeys(m for i in range(len(self.slices)) for m in self.inputs(i)))

    def value(self, i: int, model: str | None, param: str, tensor_name: str, t: float,
              default: Any = _MISSING) -> Any:
        """The value of ``param`` in slice ``i`` for ``model`` (None: a global parameter) at one tensor.

        Args:
            i: slice index (0 in the models form).
            model: a model of ``inputs(i)``, or None for method-level parameters (t, normalize, lambda, ...).
            param: parameter name.
            tensor_name: the tensor filters are matched on (a source's input name for its own parameters).
            t: the layer fraction (``layer_fraction``).
            default: returned when the recipe does not set it (else mergekit's default, else ValueError).

        Booleans come back as 0.0 / 1.0 and numbers as float; strings are returned as they are.
        """
        sl = self.slices[i]
        if model is not None and model not in self.inputs(i):
            raise ValueError(f"no model {model!r} in slice {i} of the recipe; it merges {list(self.inputs(i))}")
        own = [s.params for s in sl.sources if s.model == model] if model is not None else []
        for level in [*own, sl.params, self.params]:
            if param in level:
                v = evaluate(level[param], tensor_name, t)
                if v is not None:
                    return float(v) if isinstance(v, (bool, int, float)) else v
        if default is not _MISSING:
            return default
        spec = next((p for p in self.method.params if p.name == param), None)
        if spec is not None and spec.mergekit_default is not None:
            return spec.mergekit_default
        raise ValueError(f"recipe sets no {param!r}" + (f" for model {model!r}" if model else "")
                         + f" at {tensor_name!r} and mergekit has no default for it")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """Parse a mergekit config mapping (ValueError with the reason for anything unsupported)."""
        if "merge_method" not in d:
            raise ValueError("recipe has no merge_method")
        get_method(d["merge_method"])  # ValueError naming the known methods
        if d.get("modules"):
            raise ValueError("recipes with 'modules' are not supported; use 'models' or 'slices'")
        if bool(d.get("models")) == bool(d.get("slices")):
            raise ValueError("a recipe needs exactly one of 'models' or 'slices'")
        known = {"merge_method", "base_model", "models", "slices", "parameters", "dtype"}
        form = "models" if d.get("models") else "slices"
        slices = (_models_slice(d["models"]),) if form == "models" else tuple(
            _slice(s, f"slices[{i}]") for i, s in enumerate(_list(d["slices"], "slices")))
        return cls(d["merge_method"], slices, base_model=d.get("base_model"), dtype=d.get("dtype"), form=form,
                   params=_params(d.get("parameters"), "parameters"),
                   extra=MappingProxyType({k: v for k, v in d.items() if k not in known}))

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a YAML recipe file."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(yaml.safe_load(f) or {})

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a mergekit config mapping, in the form it was read."""
        def entry(s: Source) -> dict[str, Any]:
            e: dict[str, Any] = {"model": s.model}
            if s.layer_range is not None:
                e["layer_range"] = list(s.layer_range)
            return e | ({"parameters": _thaw_all(s.params)} if s.params else {})

        out: dict[str, Any] = {}
        if self.form == "models":
            out["models"] = [entry(s) for s in self.slices[0].sources]
        else:
            out["slices"] = [{"sources": [entry(s) for s in sl.sources]}
                             | ({"base_model": sl.base_model} if sl.base_model else {})
                             | ({"parameters": _thaw_all(sl.params)} if sl.params else {}) for sl in self.slices]
        out["merge_method"] = self.merge_method
        if self.base_model:
            out["base_model"] = self.base_model
        if self.params:
            out["parameters"] = _thaw_all(self.params)
        if self.dtype:
            out["dtype"] = self.dtype
        return out | dict(self.extra)

    def dump(self, path: str | Path | None = None) -> str:
        """YAML text of the recipe (numeric lists in flow style, as mergekit writes them); written to
        ``path`` if given."""
        text = yaml.dump(self.to_dict(), Dumper=Dumper, sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def _thaw_all(params: Mapping[str, Setting]) -> dict[str, Any]:
    return {k: thaw(v) for k, v in params.items()}


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list")
    return value


def _models_slice(models: Any) -> Slice:
    sources = []
    for m in _list(models, "models"):
        if not isinstance(m, Mapping) or "model" not in m:
            raise ValueError(f"each 'models' entry needs a 'model' key, got {m!r}")
        sources.append(Source(str(m["model"]), _params(m.get("parameters"), f"{m['model']}.parameters")))
    return _checked(Slice(tuple(sources)), "models")


def _slice(raw: Any, where: str) -> Slice:
    if not isinstance(raw, Mapping) or "sources" not in raw:
        raise ValueError(f"{where} needs 'sources' (a list of {{model, layer_range}})")
    sources = []
    for j, s in enumerate(_list(raw["sources"], f"{where}.sources")):
        w = f"{where}.sources[{j}]"
        if not isinstance(s, Mapping) or "model" not in s:
            raise ValueError(f"{w} needs a 'model' key, got {s!r}")
        r = s.get("layer_range")
        if (not isinstance(r, (list, tuple)) or len(r) != 2 or not all(isinstance(x, int) for x in r)
                or not 0 <= r[0] < r[1]):
            raise ValueError(f"{w}.layer_range must be [start, end) with 0 <= start < end, got {r!r}")
        sources.append(Source(str(s["model"]), _params(s.get("parameters"), f"{w}.parameters"), (r[0], r[1])))
    sl = Slice(tuple(sources), _params(raw.get("parameters"), f"{where}.parameters"), raw.get("base_model"))
    lengths = sorted({s.layer_range[1] - s.layer_range[0] for s in sources})
    if len(lengths) > 1:
        raise ValueError(f"all sources of {where} must span the same number of layers, got lengths {lengths}")
    return _checked(sl, where)


def _checked(sl: Slice, where: str) -> Slice:
    names = [s.model for s in sl.sources]
    if len(set(names)) != len(names):
        raise ValueError(f"a model appears twice in {where}: {names}")
    return sl


class Dumper(yaml.SafeDumper):
    """YAML dumper writing numeric lists in flow style (``[0, 0.5, 1]``), as mergekit does."""

    def represent_list(self, data):
        flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


Dumper.add_representer(list, Dumper.represent_list)
Dumper.add_representer(MappingProxyType, lambda d, m: d.represent_dict(dict(m)))

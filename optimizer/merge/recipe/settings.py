"""Parameter settings of a mergekit recipe: scalars, gradients, ``{filter, value}`` lists, and their value for one
tensor at one layer fraction (mergekit's ``evaluate_setting``).

Example:
    >>> evaluate(freeze([0.0, 1.0], "t"), "model.layers.1.mlp.up_proj.weight", layer_fraction(1, 3))
    0.5
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Setting = Any  # scalar | tuple of scalars (gradient) | tuple[Condition, ...]


@dataclass(frozen=True)
class Condition:
    """One ``{filter, value}`` entry of a conditional parameter list."""

    value: Setting
    filter: str | None = None

    def matches(self, tensor_name: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in tensor_name


def freeze(setting: Any, where: str) -> Setting:
    """YAML value -> hashable Setting (lists become tuples; dict entries become Conditions)."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, Mapping):
        if "value" not in setting:
            raise ValueError(f"{where}: a conditional parameter needs 'value' (got keys {sorted(setting)})")
        return (Condition(freeze(setting["value"], where), setting.get("filter")),)
    if isinstance(setting, (list, tuple)) and setting:
        if all(isinstance(e, Mapping) for e in setting):
            return tuple(c for e in setting for c in freeze(e, where))
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return tuple(setting)
    raise ValueError(f"{where}: unsupported parameter value {setting!r}")


def thaw(setting: Setting) -> Any:
    if isinstance(setting, tuple) and setting and isinstance(setting[0], Condition):
        return [({"filter": c.filter} if c.filter is not None else {}) | {"value": thaw(c.value)} for c in setting]
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


def layer_fraction(offset: int | None, length: int) -> float:
    """mergekit's t of a layer ``offset`` inside a slice of ``length`` layers (1 for a single layer); 0 outside
    the layers (None: embeddings, final norm, lm_head)."""
    if offset is None:
        return 0.0
    return offset / (length - 1) if length > 1 else 1.0

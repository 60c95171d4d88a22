"""The frankenMoE recipe: mergekit-moe's YAML schema plus our extras (router calibration, shared merge, seed).

Example (mergekit-moe users can reuse their file unchanged)::

    base_model: zoo://base
    gate_mode: hidden            # hidden | hidden_avg | cheap_embed | random
    experts_per_token: 1
    dtype: float32
    experts:
      - source_model: zoo://add
        positive_prompts: ["12+35=47"]
      - source_model: zoo://rev
        positive_prompts: ["rev:abc>cba"]
    calibrate: {steps: 100, lr: 0.05, rounds: 1}   # ours: router-only training; steps 0 = off (mergekit)
    shared: base                 # ours: base | merge (attention/norms/embeddings merged from the experts)
    seed: 0
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from optimizer import UserError
from optimizer.dtypes import CONFIG_NAMES

GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random")
PROMPT_GATE_MODES = ("hidden", "hidden_avg", "cheap_embed")  # modes whose gate is derived from prompts
SHARED_MODES = ("base", "merge")
PER_TRIAL = ("reuse", "refit", "full")  # calibrate.per_trial: the router of a search trial
DTYPES = CONFIG_NAMES
# mergekit-moe keys we understand but do not implement: refuse them by name rather than ignore them.
UNSUPPORTED = {
    "shared_experts": "shared experts (Qwen2-MoE style) are not supported; only Mixtral output is.",
    "tokenizer_source": "the tokenizer always comes from base_model; tokenizer merging is not supported.",
    "noise_scale": "gate noise is not supported; use gate_mode=random with a seed instead.",
    "residual_scale": "residual scaling of experts is not supported.",
}


@dataclass
class ExpertConfig:
    """One expert: whose MLPs fill slot e, and the prompts that tell the router what it is for.

    Args:
        source_model: local folder, hub id, or `zoo://name`.
        positive_prompts: texts typical of the expert's domain (gate init, and calibration by default).
        negative_prompts: texts the expert should not get; their hidden states are subtracted.
        calibration_prompts: ours; texts for router calibration, defaulting to positive_prompts.
        name: ours; label in reports and search-parameter names (default: last path part of source_model).
    """

    source_model: str
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    calibration_prompts: list[str] = field(default_factory=list)
    name: str = ""

    def calib_prompts(self) -> list[str]:
        return self.calibration_prompts or self.positive_prompts


@dataclass
class CalibrateConfig:
    """Router calibration (ours): train only the routers, on cached router inputs.

    Args:
        steps: Adam steps per layer and fit; 0 turns calibration off.
        lr: Adam learning rate.
        rounds: on-policy refits after the first fit (inputs under the router's own routing).
        max_tokens_per_expert: cap on cached tokens per expert (bounds memory on big models).
        per_trial: what a search trial does to the router after writing its experts (see moe/search.py):
            reuse = keep the router derived once at load for the unmerged experts; refit = start from that
            router and refit it on-policy (`refit_steps` Adam steps on the first `refit_prompts` calibration
            prompts per expert); full = gate init and calibration from scratch, as at load.
        refit_steps, refit_prompts: the size of a `refit`.
    """

    steps: int = 0
    lr: float = 0.05
    rounds: int = 1
    max_tokens_per_expert: int = 4096
    per_trial: str = "reuse"
    refit_steps: int = 20
    refit_prompts: int = 32


@dataclass
class MoeConfig:
    """A frankenMoE recipe (see the module docstring for the YAML form)."""

    base_model: str
    experts: list[ExpertConfig]
    gate_mode: str = "hidden"
    experts_per_token: int = 2
    dtype: str = "auto"
    architecture: str = "mixtral"
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    shared: str = "base"
    seed: int = 0

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def to_dict(self) -> dict[str, Any]:
        """Plain data, the inverse of `from_dict` (written next to a built MoE)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["experts"] = [{f.name: getattr(e, f.name) for f in fields(e)} for e in self.experts]
        out["calibrate"] = {f.name: getattr(self.calibrate, f.name) for f in fields(self.calibrate)}
        return out


def load_moe_config(source: str | Path | Mapping[str, Any] | Any) -> MoeConfig:
    """Read and validate a recipe from a YAML file, a mapping, or a Hydra/OmegaConf node (`cfg.moe`).

    Args:
        source: path to a YAML file, or the already-parsed recipe.

    Raises:
        UserError: naming the offending key and what to do about it.
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_config(source):  # a Hydra `cfg.moe` node: plain containers make validation simple
        source = OmegaConf.to_container(source, resolve=True)
    if isinstance(source, Mapping):
        return from_dict(source)
    path = Path(source)
    if not path.is_file():
        raise UserError(f"MoE recipe {str(path)!r} does not exist; pass a YAML file such as optimizer/conf/moe/demo.yaml.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"MoE recipe {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise UserError(f"MoE recipe {str(path)!r} must be a mapping with base_model, gate_mode and experts.")
    return from_dict(data)


def from_dict(data: Mapping[str, Any]) -> MoeConfig:
    """Build a MoeConfig from plain data and validate it (see `validate`)."""
    # mergekit writes null for "default"; drop those keys so our defaults apply.
    data = {k: v for k, v in data.items() if v is not None}
    _check_keys(data, MoeConfig, "")
    if not data.get("base_model"):
        raise UserError("base_model is missing: name the model the attention, norms and embeddings come "
                        "from (a local folder, hub id, or zoo://base).")
    raw_experts = data.pop("experts", None) or []
    if not isinstance(raw_experts, list):
        raise UserError("experts must be a list of {source_model, positive_prompts, negative_prompts}.")
    experts = [_expert(i, e) for i, e in enumerate(raw_experts)]
    calib = data.pop("calibrate", None) or {}
    if not isinstance(calib, Mapping):
        raise UserError("calibrate must be a mapping like {steps: 100, lr: 0.05, rounds: 1} (steps: 0 = off).")
    _check_keys(calib, CalibrateConfig, "calibrate.")
    cfg = MoeConfig(experts=experts, calibrate=CalibrateConfig(**calib), **data)
    validate(cfg)
    return cfg


def _check_keys(data: Mapping[str, Any], schema: type, prefix: str) -> None:
    known = {f.name for f in fields(schema)}
    for key in data:
        if key in UNSUPPORTED:
            raise UserError(f"{prefix}{key}: {UNSUPPORTED[key]} Remove the key.")
        if key not in known:
            raise UserError(f"{prefix}{key}: unknown key. Known keys: {', '.join(sorted(known))}.")


def _expert(i: int, raw: Any) -> ExpertConfig:
    if isinstance(raw, str):  # allow the shorthand `- zoo://add` for random gates
        raw = {"source_model": raw}
    if not isinstance(raw, Mapping) or not raw.get("source_model"):
        raise UserError(f"experts[{i}] needs source_model (a local folder, hub id, or zoo://name).")
    _check_keys(raw, ExpertConfig, f"experts[{i}].")
    raw = dict(raw)
    for key in ("positive_prompts", "negative_prompts", "calibration_prompts"):
        value = raw.get(key) or []
        if isinstance(value, str):
            value = [value]
        if not all(isinstance(p, str) for p in value):
            raise UserError(f"experts[{i}].{key} must be a list of strings.")
        raw[key] = list(value)
    exp = ExpertConfig(**raw)
    exp.name = exp.name or exp.source_model.rstrip("/").split("/")[-1]
    return exp


def validate(cfg: MoeConfig) -> None:
    """Check a recipe before any model is loaded; tensor-level checks live in `sources.check_experts`.

    Raises:
        UserError: naming the key and what to do.
    """
    n = len(cfg.experts)
    if n < 2:
        raise UserError(f"experts: {n} given, at least 2 are needed for a mixture; list one entry per "
                        "fine-tuned model (N = 2, 4 or 8 is usual).")
    if cfg.architecture != "mixtral":
        raise UserError(f"architecture={cfg.architecture!r}: only mixtral output is supported.")
    if cfg.gate_mode not in GATE_MODES:
        hint = " (mergekit's uniform_random: use random, seeded by `seed`)" if cfg.gate_mode == "uniform_random" else ""
        raise UserError(f"gate_mode={cfg.gate_mode!r} is not one of {', '.join(GATE_MODES)}{hint}.")
    if cfg.shared not in SHARED_MODES:
        raise UserError(f"shared={cfg.shared!r} is not one of {', '.join(SHARED_MODES)} (base: attention, "
                        "norms and embeddings from base_model; merge: a searched merge of the experts').")
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype={cfg.dtype!r} is not one of {', '.join(DTYPES)}.")
    if not isinstance(cfg.experts_per_token, int) or not 1 <= cfg.experts_per_token <= n:
        raise UserError(f"experts_per_token={cfg.experts_per_token!r} but there are {n} experts; set it "
                        f"between 1 and {n} (1 or 2 is usual).")
    c = cfg.calibrate
    for key, kind in (("steps", int), ("lr", (int, float)), ("rounds", int), ("max_tokens_per_expert", int),
                      ("refit_steps", int), ("refit_prompts", int)):
        value = getattr(c, key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UserError(f"calibrate.{key}={value!r} must be a number ({'an integer' if kind is int else 'e.g. 0.05'}).")
    if c.steps < 0 or c.lr <= 0 or c.rounds < 0 or c.max_tokens_per_expert < 1:
        raise UserError("calibrate: steps must be >= 0 (0 = off), lr > 0, rounds >= 0 and "
                        "max_tokens_per_expert >= 1.")
    if c.per_trial not in PER_TRIAL or c.refit_steps < 0 or c.refit_prompts < 1:
        raise UserError(f"calibrate: per_trial={c.per_trial!r} must be one of {', '.join(PER_TRIAL)} (what a search "
                        "trial does to the router), refit_steps >= 0 and refit_prompts >= 1.")
    _check_distinct(cfg)
    _check_prompts(cfg)


def _check_distinct(cfg: MoeConfig) -> None:
    seen: dict[str, int] = {}
    names: dict[str, int] = {}
    for i, e in enumerate(cfg.experts):
        key = e.source_model.rstrip("/")
        if key in seen:
            raise UserError(f"experts[{i}].source_model={e.source_model!r} is the same model as "
                            f"experts[{seen[key]}]; identical experts give the router nothing to choose "
                            "between. Remove one, or use a different fine-tune.")
        seen[key] = i
        if e.name in names:
            raise UserError(f"experts[{i}] and experts[{names[e.name]}] are both named {e.name!r}; set a "
                            "distinct `name:` on one of them (it labels reports and search parameters).")
        names[e.name] = i


def _check_prompts(cfg: MoeConfig) -> None:
    uses_prompts = cfg.gate_mode in PROMPT_GATE_MODES
    for i, e in enumerate(cfg.experts):
        if uses_prompts and not e.positive_prompts:
            raise UserError(f"experts[{i}].positive_prompts is empty but gate_mode={cfg.gate_mode} derives "
                            "the gate from them; add a few prompts typical of the expert's domain, or use "
                            "gate_mode=random.")
        if cfg.calibrate.steps and not e.calib_prompts():
            raise UserError(f"experts[{i}] has neither calibration_prompts nor positive_prompts but "
                            "calibrate.steps > 0; add prompts or set calibrate.steps=0.")
    if uses_prompts:
        _check_same_sets(cfg, "positive_prompts", lambda e: (e.positive_prompts, e.negative_prompts))
    if cfg.calibrate.steps:
        _check_same_sets(cfg, "calibration prompts", lambda e: (e.calib_prompts(), []))


def _check_same_sets(cfg: MoeConfig, what: str, get: Any) -> None:
    seen: dict[tuple, int] = {}
    for i, e in enumerate(cfg.experts):
        pos, neg = get(e)
        key = (frozenset(pos), frozenset(neg))
        if key in seen:
            raise UserError(f"experts[{i}] and experts[{seen[key]}] have identical {what}; their gates would "
                            "be identical and the router could not tell them apart. Give each expert "
                            "prompts from its own domain.")
        seen[key] = i

"""Recipe -> live MoE -> folder: what `python -m optimizer.moe` does, usable from Python too."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .assemble import build_moe, write_shared
from .calibrate import derive_router
from .config import MoeConfig
from .sources import MoeSources, check_distinct_weights, load_tokenizer, open_sources

RECIPE_FILE = "moe.yaml"  # written next to the weights; routing analysis reads expert names from it


@dataclass
class BuiltMoe:
    """A live MoE with everything needed to evaluate, search or save it."""

    model: Any
    tokenizer: Any
    cfg: MoeConfig
    sources: MoeSources
    router_stats: dict[str, float] = field(default_factory=dict)


def build_from_config(cfg: MoeConfig, device: torch.device | str = "cpu") -> BuiltMoe:
    """Locate, check, load and assemble the recipe's MoE, then initialise (and calibrate) its router.

    With `shared: merge` and no searched weights, the shared tensors are the plain average of the experts'
    (task arithmetic with weight 1/N each); the search replaces them per trial.

    Args:
        cfg: a validated recipe.
        device: where the live model lives.

    Raises:
        UserError: a model is missing, shapes differ, or two experts are identical.
    """
    src = open_sources(cfg)
    dtype = src.dtype(cfg.dtype)
    experts = [src.expert_mlps(e) for e in range(len(cfg.experts))]
    check_distinct_weights(experts, cfg.expert_names)
    base_config = _base_config(src)
    model = build_moe(base_config, src.base_state(), experts, experts_per_token=cfg.experts_per_token,
                      dtype=dtype, device=device)
    del experts
    if cfg.shared == "merge":
        write_shared(model, mean_shared(src))
    tokenizer = load_tokenizer(src.base)
    stats = derive_router(model, tokenizer, cfg)
    return BuiltMoe(model, tokenizer, cfg, src, stats)


def _base_config(src: MoeSources) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(src.base.path))


def mean_shared(src: MoeSources) -> dict[str, torch.Tensor]:
    """The experts' non-MLP tensors averaged, one tensor at a time (float32 accumulation)."""
    out = {}
    n = len(src.experts)
    for name in src.shared_names:
        acc = sum(ckpt.tensor(name).float() for ckpt in src.experts)
        out[name] = acc / n
    return out


def save_moe(built: BuiltMoe, out_dir: str | Path) -> Path:
    """Write weights (classic `block_sparse_moe.experts.N.w1/w2/w3` layout), tokenizer, generation config,
    the recipe (`moe.yaml`) and the router stats; reloads with AutoModelForCausalLM."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = _base_generation_config(built.sources)
    if gen is not None:
        built.model.generation_config = gen
    built.model.save_pretrained(out)
    built.tokenizer.save_pretrained(out)
    (out / RECIPE_FILE).write_text(yaml.safe_dump(built.cfg.to_dict(), sort_keys=False, allow_unicode=True),
                                   encoding="utf-8")
    (out / "router_stats.json").write_text(json.dumps(built.router_stats, indent=2) + "\n")
    return out


def _base_generation_config(src: MoeSources) -> Any:
    from transformers import GenerationConfig

    if not (src.base.path / "generation_config.json").exists():
        return None
    return GenerationConfig.from_pretrained(str(src.base.path))

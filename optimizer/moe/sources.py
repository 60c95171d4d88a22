"""The models a recipe names: located, checked from file headers, then loaded tensor by tensor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from optimizer import UserError
from optimizer.checkpoint import Checkpoint, TensorInfo
from optimizer.dtypes import parse_dtype

from .config import MoeConfig
from .layout import is_mlp


@dataclass
class MoeSources:
    """The base and expert checkpoints of one recipe, checked for shape compatibility."""

    base: Checkpoint
    experts: list[Checkpoint]
    base_infos: dict[str, TensorInfo]

    def dtype(self, name: str) -> torch.dtype:
        """The recipe's `dtype`, or the base checkpoint's floating dtype for `auto`."""
        fallback = next(i.dtype for i in self.base_infos.values() if i.dtype.is_floating_point)
        return parse_dtype(name, fallback)

    @property
    def shared_names(self) -> list[str]:
        """The base's non-MLP tensor names (attention, norms, embeddings, lm_head), in checkpoint order."""
        return [n for n in self.base_infos if not is_mlp(n)]

    def base_state(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor of the base except its MLPs (the MoE takes those from the experts)."""
        return {n: self.base.tensor(n, device) for n in self.shared_names}

    def expert_mlps(self, e: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Dense MLP tensors of expert e."""
        return {n: self.experts[e].tensor(n, device) for n in self.base_infos if is_mlp(n)}

    def expert_shared(self, e: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Non-MLP tensors of expert e (only `shared=merge` needs them)."""
        return {n: self.experts[e].tensor(n, device) for n in self.shared_names}


def open_sources(cfg: MoeConfig) -> MoeSources:
    """Locate every model of the recipe and check shapes from headers, before loading any tensor.

    Raises:
        UserError: a model cannot be found, or an expert's tensors do not fit the base's shapes.
    """
    base = Checkpoint(cfg.base_model, what="base_model")
    infos = base.infos()
    if not any(is_mlp(n) for n in infos):
        raise UserError(f"base_model={cfg.base_model!r} has no model.layers.N.mlp.*_proj.weight tensors; "
                        "it is not a Mistral/Llama-style dense model.")
    experts = []
    for i, exp in enumerate(cfg.experts):
        ckpt = Checkpoint(exp.source_model, what=f"experts[{i}].source_model")
        check_expert_shapes(infos, ckpt.infos(), i, exp.source_model, need_shared=cfg.shared == "merge")
        experts.append(ckpt)
    return MoeSources(base, experts, infos)


def check_expert_shapes(base: Mapping[str, TensorInfo], expert: Mapping[str, TensorInfo], i: int, ref: str,
                        need_shared: bool) -> None:
    """Every MLP tensor of the base must exist in the expert with the same shape; non-MLP tensors it has
    must match too (and must all exist when the shared tensors are merged from the experts)."""
    for name, info in base.items():
        other = expert.get(name)
        if other is None:
            if is_mlp(name) or need_shared:
                why = "an MLP tensor" if is_mlp(name) else "needed by shared=merge"
                raise UserError(f"experts[{i}]={ref!r} lacks {name!r} ({why}); experts must be fine-tunes "
                                "of base_model with the same architecture.")
            continue
        if other.shape != info.shape:
            part = "MLP" if is_mlp(name) else "non-MLP"
            raise UserError(f"experts[{i}]={ref!r}: {part} tensor {name!r} has shape {list(other.shape)} but "
                            f"base_model has {list(info.shape)}. Experts must be fine-tunes of base_model "
                            "with the same shapes (e.g. resize a grown vocabulary back to the base's, or "
                            "pick the base they were fine-tuned from).")


def check_distinct_weights(expert_mlps: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> None:
    """Refuse two experts whose MLP weights are identical (e.g. the same model under two paths).

    Raises:
        UserError: naming both experts.
    """
    for a in range(len(expert_mlps)):
        for b in range(a):
            if _same(expert_mlps[a], expert_mlps[b]):
                raise UserError(f"experts[{a}] ({names[a]}) and experts[{b}] ({names[b]}) have identical MLP "
                                "weights; identical experts give the router nothing to choose between. "
                                "Remove one, or use a different fine-tune.")


def _same(x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> bool:
    # all() stops at the first differing tensor: distinct fine-tunes differ in the first one, so this is cheap.
    return all(torch.equal(x[n], y[n]) for n in x)


def load_tokenizer(base: Checkpoint) -> Any:
    """The base model's tokenizer, with a pad token (EOS stands in when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base.path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok

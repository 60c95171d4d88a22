"""Assemble a live transformers MixtralForCausalLM in memory, and write experts/shared tensors into it in place.

The search builds the MoE once and then, per trial, only copies tensors into the existing parameters
(`write_expert_mlps`, `write_shared`), so the lm-eval wrapper around it never has to be rebuilt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import MixtralConfig, MixtralForCausalLM, PretrainedConfig

from optimizer import UserError

from .layout import expert_views, is_mlp, shared_params

SUPPORTED_BASES = ("mistral", "llama")
# Dense-config fields that mean the same in MixtralConfig; everything else takes Mixtral's defaults.
_COPIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
           "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
           "rope_parameters", "sliding_window", "attention_dropout")


def moe_config(base: PretrainedConfig, n_experts: int, experts_per_token: int) -> MixtralConfig:
    """The MixtralConfig of an MoE whose experts have `base`'s shapes.

    Args:
        base: config of the dense base model (Mistral or bias-free Llama).
        n_experts: number of experts E.
        experts_per_token: top-k of the router.
    """
    if base.model_type not in SUPPORTED_BASES:
        raise UserError(f"base_model is a {base.model_type!r} model; a Mixtral MoE can be built from "
                        f"{' or '.join(SUPPORTED_BASES)} models only.")
    if getattr(base, "attention_bias", False) or getattr(base, "mlp_bias", False):
        raise UserError("base_model uses attention or MLP biases, which Mixtral has no place for.")
    kwargs = {k: getattr(base, k) for k in _COPIED if getattr(base, k, None) is not None}
    kwargs.setdefault("sliding_window", None)  # Llama has none; Mixtral's default would be wrong
    return MixtralConfig(**kwargs, num_local_experts=n_experts, num_experts_per_tok=experts_per_token,
                         architectures=["MixtralForCausalLM"])


def build_moe(base_config: PretrainedConfig, base_state: Mapping[str, torch.Tensor],
              expert_mlp_states: Sequence[Mapping[str, torch.Tensor]], *, experts_per_token: int,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> MixtralForCausalLM:
    """A live Mixtral: shared tensors from `base_state`, expert e's MLPs from `expert_mlp_states[e]`.

    Routers start at zero (uniform routing); set them with `router.init_gates`. All parameters are frozen
    (`requires_grad=False`): the model is only evaluated, and calibration trains on cached router inputs.

    Args:
        base_config: the dense base's config (shapes, rope, norms).
        base_state: dense tensor name -> tensor; every non-MLP tensor of the base (lm_head may be absent
            when embeddings are tied).
        expert_mlp_states: one mapping per expert holding its dense MLP tensors
            (`model.layers.N.mlp.{gate,up,down}_proj.weight`); other names are ignored.
        experts_per_token: router top-k.
        dtype: parameter dtype of the live model.
        device: where the live model lives (any torch device).

    Example:
        >>> moe = build_moe(base.config, base.state_dict(), [a.state_dict(), b.state_dict()],
        ...                 experts_per_token=1)  # doctest: +SKIP
    """
    cfg = moe_config(base_config, len(expert_mlp_states), experts_per_token)
    # Build on the meta device so a 47B Mixtral is never randomly initialised only to be overwritten.
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg)
    model.to(dtype).to_empty(device=device)
    # to_empty leaves buffers uninitialised; the rotary tables are the only ones, so rebuild that module.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(device)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.requires_grad_(False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
        write_shared(model, {n: t for n, t in base_state.items() if not is_mlp(n)}, complete=True)
        for e, state in enumerate(expert_mlp_states):
            write_expert_mlps(model, e, {n: t for n, t in state.items() if is_mlp(n)}, complete=True)
    return model.eval()


def write_expert_mlps(model: MixtralForCausalLM, expert: int, tensors: Mapping[str, torch.Tensor], *,
                      complete: bool = False) -> None:
    """Copy dense MLP tensors into expert slot `expert` of the live fused tensors, in place.

    Args:
        model: the live MoE.
        expert: slot index.
        tensors: dense MLP name (`model.layers.N.mlp.up_proj.weight`) -> tensor of the dense shape.
        complete: require every MLP tensor of the slot (used when building).
    """
    views = expert_views(model, expert)
    _copy_into(views, tensors, complete, "expert MLP")


def write_shared(model: MixtralForCausalLM, tensors: Mapping[str, torch.Tensor], *,
                 complete: bool = False) -> None:
    """Copy shared tensors (attention, norms, embeddings, lm_head) into the live MoE, in place.

    Args:
        model: the live MoE.
        tensors: dense name -> tensor; the names are the same in the dense model and the MoE.
        complete: require every shared tensor (a tied lm_head is filled through the embeddings).
    """
    live = shared_params(model)
    if complete and model.config.tie_word_embeddings and "lm_head.weight" not in tensors:
        live.pop("lm_head.weight", None)
    _copy_into(live, tensors, complete, "shared")


def _copy_into(live: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], complete: bool,
               kind: str) -> None:
    unknown = [n for n in tensors if n not in live]
    if unknown:
        hint = " (MLP tensors go through write_expert_mlps)" if is_mlp(unknown[0]) else ""
        raise KeyError(f"{unknown[0]!r} is not a {kind} tensor of this MoE{hint}")
    if complete:
        missing = [n for n in live if n not in tensors]
        if missing:
            raise KeyError(f"no tensor given for {missing[0]!r} ({len(missing)} {kind} tensors missing)")
    with torch.no_grad():
        for name, t in tensors.items():
            dst = live[name]
            if tuple(dst.shape) != tuple(t.shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not fit the MoE's {tuple(dst.shape)}")
            dst.copy_(t)

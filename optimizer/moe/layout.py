"""Where a dense (Mistral/Llama) tensor lives inside the live Mixtral: the name map and in-place views.

transformers 5.x fuses each layer's experts into two parameters (verified on 5.23):
    mlp.experts.gate_up_proj (E, 2*I, H) = cat(gate_proj, up_proj) per expert
    mlp.experts.down_proj    (E, H, I)
    mlp.gate.weight          (E, H)       the router
Attention, norms, embeddings and lm_head keep their dense names, so they map to themselves.
"""

from __future__ import annotations

import re

import torch

_MLP = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_ROUTER = re.compile(r"^model\.layers\.\d+\.mlp\.gate\.weight$")
_EXPERTS = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.")


def is_mlp(name: str) -> bool:
    """True for a dense MLP tensor name, e.g. `model.layers.3.mlp.up_proj.weight` (one expert's slot)."""
    return _MLP.match(name) is not None


def mlp_slot(name: str, intermediate: int) -> tuple[str, slice]:
    """The fused MoE parameter and the row range of one expert's matrix that dense `name` fills.

    Args:
        name: a dense MLP tensor name (see `is_mlp`).
        intermediate: the MLP width I (rows of gate_proj).

    Returns:
        (Mixtral parameter name, rows within `param[e]`).
    """
    m = _MLP.match(name)
    if m is None:
        raise KeyError(f"{name!r} is not a dense MLP tensor (model.layers.N.mlp.{{gate,up,down}}_proj.weight)")
    prefix = f"model.layers.{m['layer']}.mlp.experts."
    if m["proj"] == "gate_proj":
        return prefix + "gate_up_proj", slice(0, intermediate)
    if m["proj"] == "up_proj":
        return prefix + "gate_up_proj", slice(intermediate, 2 * intermediate)
    return prefix + "down_proj", slice(None)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # remove_duplicate=False so a tied lm_head is reachable under its own name too.
    return dict(model.named_parameters(remove_duplicate=False))


def expert_views(model: torch.nn.Module, expert: int) -> dict[str, torch.Tensor]:
    """Dense MLP name -> a view into the live fused tensors of slot `expert`; `view.copy_(t)` writes in place.

    Args:
        model: a live MixtralForCausalLM.
        expert: slot index in [0, num_local_experts).
    """
    n_exp, inter = model.config.num_local_experts, model.config.intermediate_size
    if not 0 <= expert < n_exp:
        raise IndexError(f"expert {expert} out of range: the MoE has {n_exp} experts")
    live = params(model)
    out = {}
    for layer in range(model.config.num_hidden_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.{proj}.weight"
            param, rows = mlp_slot(name, inter)
            out[name] = live[param].data[expert][rows]
    return out


def shared_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> live parameter for every tensor every expert shares (attention, norms, embeddings, lm_head)."""
    return {n: p.data for n, p in params(model).items() if not (_ROUTER.match(n) or _EXPERTS.match(n))}


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The per-layer router modules (`mlp.gate`, output (logits, top-k weights, top-k indices))."""
    return [layer.mlp.gate for layer in model.model.layers]

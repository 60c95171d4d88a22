"""FrankenMoE: assemble dense fine-tunes into a live Mixtral, initialise and calibrate its router, search
through it, analyse its routing. See DESIGN.md §7.

Modules: config (recipe schema), layout (dense name -> fused MoE slot), assemble (live model, in-place
writes), router (gate init, forced routing), calibrate (router-only training), sources (checkpoints),
build (recipe -> saved model), search (what a study trial calls), routing / routing_cli (analysis),
measure (the demo-zoo table). Exports load lazily so reading a recipe does not import transformers.
"""

from importlib import import_module

_EXPORTS = {
    "MoeConfig": "config", "load_moe_config": "config",
    "build_moe": "assemble", "write_expert_mlps": "assemble", "write_shared": "assemble",
    "init_gates": "router", "forced_routing": "router",
    "calibrate_router": "calibrate", "derive_router": "calibrate",
    "build_from_config": "build", "save_moe": "build",
    "MoeApplier": "search", "build_live_moe": "search", "live_tensor_names": "search",
    "analyse": "routing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'optimizer.moe' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)

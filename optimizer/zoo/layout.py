"""Names and places of the demo zoo (no heavy imports): what the builder, the scorer and the CLI share."""

from __future__ import annotations

import os
from pathlib import Path

RECIPE_VERSION = 3
EXPERTS = ("add", "rev", "kana")
# The same skills fine-tuned with only `mlp.*` trainable. A frankenMoE keeps nothing of an expert but its
# MLPs; the full fine-tunes keep much of their skill in attention (oracle-routed MoE ~0.56x of the expert).
MOE_EXPERTS = tuple(f"{skill}_mlp" for skill in EXPERTS)
SKILL_OF = {**{e: e for e in EXPERTS}, **dict(zip(MOE_EXPERTS, EXPERTS, strict=True))}
MODELS = ("base", *EXPERTS, *MOE_EXPERTS)
ZOO_TASKS = ("zoo_add", "zoo_rev", "zoo_kana")
# Same tasks on the held-out split (lm-eval 0.4.13 cannot override test_split of a registered task).
ZOO_TASKS_HELDOUT = ("zoo_add_heldout", "zoo_rev_heldout", "zoo_kana_heldout")
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MANIFEST = "zoo.json"
SCHEME = "zoo://"


def cache_dir() -> Path:
    """`$MERGE_OPTIMIZER_CACHE`, default `~/.cache/merge-optimizer`."""
    return Path(os.environ.get("MERGE_OPTIMIZER_CACHE", "~/.cache/merge-optimizer")).expanduser()


def zoo_dir() -> Path:
    """Where the zoo lives: `$MERGE_OPTIMIZER_ZOO` if set, else `<cache_dir>/zoo/v<RECIPE_VERSION>`."""
    explicit = os.environ.get("MERGE_OPTIMIZER_ZOO")
    return Path(explicit).expanduser() if explicit else cache_dir() / "zoo" / f"v{RECIPE_VERSION}"


def is_built(root: Path) -> bool:
    """True when `root` holds a complete zoo of the current recipe version."""
    import json

    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("recipe_version") == RECIPE_VERSION

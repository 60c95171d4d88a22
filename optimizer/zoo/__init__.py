"""The demo model zoo: a tiny Mistral base, three skill experts fine-tuned from it, three MLP-only variants of
them (frankenMoE sources), and their lm-eval tasks.

Everything offline runs on it. Importing this package is cheap; training code loads only when a build runs.

Example:
    >>> from optimizer.zoo import ensure_zoo, resolve_model_ref
    >>> root = ensure_zoo()                     # builds once (~2-3 min on 2 CPU cores), then cached
    >>> resolve_model_ref("zoo://add")          # -> "~/.cache/merge-optimizer/zoo/v3/add"
"""

from __future__ import annotations

from pathlib import Path

from .layout import (
    EXPERTS,
    MANIFEST,
    MODELS,
    MOE_EXPERTS,
    RECIPE_VERSION,
    SCHEME,
    SKILL_OF,
    TASKS_DIR,
    ZOO_TASKS,
    ZOO_TASKS_HELDOUT,
    cache_dir,
    is_built,
    zoo_dir,
)


def ensure_zoo(out: Path | str | None = None, *, force: bool = False, progress: bool = False) -> Path:
    """Return the zoo folder, building it first if it is missing or from another recipe version.

    Args:
        out: zoo folder; default `zoo_dir()`.
        force: rebuild even if a current zoo is there.
        progress: show a progress display while building.
    """
    root = Path(out).expanduser() if out is not None else zoo_dir()
    if force or not is_built(root):
        from .build import build_zoo

        build_zoo(root, force=force, progress=progress)
    return root


def resolve_model_ref(ref: str) -> str:
    """Map `zoo://base`, `zoo://add`, `zoo://add_mlp`, ... (any of `MODELS`) to local folders (building the
    zoo if needed); any other reference (a path or hub id) is returned unchanged.

    Args:
        ref: model reference from a config.
    """
    if not ref.startswith(SCHEME):
        return ref
    name = ref[len(SCHEME):].strip("/")
    if name not in MODELS:
        from optimizer import UserError

        raise UserError(f"unknown zoo model {ref!r}; the zoo has {', '.join(SCHEME + m for m in MODELS)}")
    if not is_built(zoo_dir()):  # first use: say why nothing else happens for a few minutes
        import sys

        print(f"building the demo zoo in {zoo_dir()} (first use only, ~3 min on 2 CPU cores) ...",
              file=sys.stderr, flush=True)
        return str(ensure_zoo(progress=True) / name)
    return str(ensure_zoo() / name)


__all__ = [
    "EXPERTS", "MANIFEST", "MODELS", "MOE_EXPERTS", "SCHEME", "RECIPE_VERSION", "SKILL_OF", "TASKS_DIR", "ZOO_TASKS",
    "ZOO_TASKS_HELDOUT",
    "cache_dir", "ensure_zoo", "is_built", "resolve_model_ref", "zoo_dir",
]

"""Files shipped inside the package (Hydra configs, zoo task YAMLs, MT-Bench files), found from wherever
the package is installed: an editable checkout and a wheel in site-packages resolve the same way."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PACKAGE_DIR = Path(str(files("optimizer")))
CONF_DIR = PACKAGE_DIR / "conf"
DATA_DIR = PACKAGE_DIR / "data"


def resolve_path(path: str | Path) -> Path:
    """A user-given path: absolute as is; else relative to the working directory if it exists there;
    else relative to the installed package (`zoo/tasks`, `data/mt_bench/en`); else unchanged, so the
    caller's "not found" message names what the user typed."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    shipped = PACKAGE_DIR / p
    return shipped if shipped.exists() else p

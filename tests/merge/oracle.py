"""mergekit as the oracle: run a recipe through mergekit (in this environment, or the ``mergekit-yaml`` named by
$MERGEKIT_YAML when mergekit lives in a second environment) and read tensors back.

Skip policy: without mergekit the oracle tests skip with a visible reason, unless
MERGE_OPTIMIZER_ORACLE=require (CI, set by ``.ci/oracle-env``), where a missing mergekit is an error.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

MERGEKIT_YAML = os.environ.get("MERGEKIT_YAML")
REQUIRED = os.environ.get("MERGE_OPTIMIZER_ORACLE") == "require"


def available() -> bool:
    if MERGEKIT_YAML:
        return Path(MERGEKIT_YAML).exists() or shutil.which(MERGEKIT_YAML) is not None
    return importlib.util.find_spec("mergekit") is not None


def require() -> None:
    """Skip the calling test module when mergekit is missing (fail instead under MERGE_OPTIMIZER_ORACLE=require)."""
    if available():
        return
    where = f"MERGEKIT_YAML={MERGEKIT_YAML!r} does not exist" if MERGEKIT_YAML else "mergekit is not installed"
    if REQUIRED:
        raise RuntimeError(f"{where}, but MERGE_OPTIMIZER_ORACLE=require: run .ci/oracle-env first")
    pytest.skip(f"{where} (pip install mergekit, or .ci/oracle-env): mergekit oracle tests skipped",
                allow_module_level=True)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_mergekit(doc: dict, out: Path) -> dict[str, torch.Tensor]:
    """mergekit's output tensors for one recipe document (written to ``out``)."""
    if MERGEKIT_YAML:
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        r = subprocess.run([MERGEKIT_YAML, str(path), str(out), "--quiet", "--no-write-model-card",
                            "--device", "cpu"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return weights(out)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    logging.disable(logging.WARNING)
    try:
        run_merge(MergeConfiguration.model_validate(doc), str(out),
                  options=MergeOptions(quiet=True, write_model_card=False, device="cpu"))
    finally:
        logging.disable(logging.NOTSET)
    return weights(out)


def max_diff(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> float:
    assert set(theirs) == set(ours), sorted(set(theirs) ^ set(ours))
    return max(float((theirs[k].double() - ours[k].double()).abs().max()) for k in ours)

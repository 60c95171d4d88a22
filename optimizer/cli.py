"""Shared CLI plumbing: Hydra entry points that turn UserError into a one-paragraph message and exit 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from optimizer import UserError
from optimizer.resources import CONF_DIR as PACKAGE_CONF_DIR

# lm-eval and transformers draw a tqdm bar per evaluation (thousands of lines over a study); tqdm reads this at
# import time, so it is set before anything imports it. TQDM_DISABLE=0 in the environment brings them back.
os.environ.setdefault("TQDM_DISABLE", "1")

CONF_DIR = str(PACKAGE_CONF_DIR)


def fail(msg: str) -> None:
    from optimizer.secrets import redact_text

    print(f"error: {redact_text(msg)}", file=sys.stderr)
    raise SystemExit(2)


def _study_dir(name: Any) -> str:
    """`${study_dir:${study_name}}` in conf/config.yaml's run dir: a bad study_name is exit 2 before Hydra
    creates any folder (SystemExit passes through OmegaConf and Hydra, which make tracebacks of exceptions)."""
    from optimizer.config import check_study_name

    try:
        return check_study_name(name)
    except UserError as e:
        fail(str(e))
        raise


def save_run_config(cfg: Any) -> None:
    """Hydra's record of the run (`<run dir>/.hydra/{config,hydra,overrides}.yaml`) with passwords redacted.

    conf/config.yaml sets `hydra.output_subdir: null`, so Hydra itself writes none of these (it would write
    a password given on the command line in plain text); this writes them, redacted, before the task runs.
    """
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from optimizer.secrets import redact

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir) / ".hydra"
    docs = {"config.yaml": OmegaConf.to_container(cfg, resolve=False, enum_to_str=True),
            "hydra.yaml": {"hydra": OmegaConf.to_container(hc, resolve=False, enum_to_str=True)},
            "overrides.yaml": list(hc.overrides.task)}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, doc in docs.items():
            (out / name).write_text(OmegaConf.to_yaml(OmegaConf.create(redact(doc))), encoding="utf-8")
    except OSError as e:
        fail(f"cannot write the run record under {str(out)!r}: {e.strerror or e}; point run_root at a "
             "writable folder.")


def hydra_entry(task: Callable[[Any], int], config_name: str = "config") -> Callable[[], None]:
    """Wrap `task(cfg) -> exit code` as a Hydra app over `conf/`.

    Hydra exits 1 on a bad override (unknown group option, wrong type) before `task` runs; that is bad
    input too, so it becomes exit code 2.
    """
    import hydra
    from omegaconf import OmegaConf

    from optimizer.config import register_configs

    register_configs()
    OmegaConf.register_new_resolver("study_dir", _study_dir, replace=True)
    entered = False

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)
    def _app(cfg: Any) -> None:
        nonlocal entered
        entered = True
        save_run_config(cfg)
        try:
            code = task(cfg)
        except UserError as e:
            fail(str(e))
        raise SystemExit(code)

    def main() -> None:
        try:
            _app()
        except SystemExit as e:
            if e.code == 1 and not entered:
                raise SystemExit(2) from None
            raise

    return main

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
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def hydra_entry(task: Callable[[Any], int], config_name: str = "config") -> Callable[[], None]:
    """Wrap `task(cfg) -> exit code` as a Hydra app over `conf/`.

    Hydra exits 1 on a bad override (unknown group option, wrong type) before `task` runs; that is bad
    input too, so it becomes exit code 2.
    """
    import hydra

    from optimizer.config import register_configs

    register_configs()
    entered = False

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)
    def _app(cfg: Any) -> None:
        nonlocal entered
        entered = True
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

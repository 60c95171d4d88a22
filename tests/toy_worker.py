"""A study worker on the tiny models, for tests needing real processes: `python -m tests.toy_worker CFG.json`.

Runs `optimizer.runner.run` (what `python -m optimizer` runs) with the toy evaluator of tests/conftest.py,
optionally slowed down (`evaluator.sleep` seconds per evaluation) so that a kill can land inside a trial or
an export. With TOY_WORKER_BARRIER=PATH set, a worker touches PATH.<pid>.ready once imported and waits for
PATH to exist, so several workers start their studies together. Exit codes are the CLI's: 0, 1, 2
(UserError, one paragraph on stderr), 130.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from optimizer.eval import EVALUATORS, register_evaluator

from .conftest import ToyEvaluator


class SlowToy(ToyEvaluator):
    """The toy evaluator, `cfg.sleep` seconds slower per evaluation."""

    name = "toy_slow"

    def evaluate(self, model, tokenizer, split, *, on_item=None):
        time.sleep(float(self.cfg.get("sleep", 0.0)))
        return super().evaluate(model, tokenizer, split, on_item=on_item)


if "toy_slow" not in EVALUATORS:
    register_evaluator("toy_slow")(SlowToy)


def toy_config(tiny_models: dict[str, Path], run_root: Path, *, sleep: float = 0.0,
               **kw: Any) -> dict[str, Any]:
    """A plain-data run config over the tiny models (what test_runner's make_cfg builds), for a worker."""
    cfg: dict[str, Any] = {
        "study_name": "t", "run_root": str(run_root), "n_trials": 6, "threads": 1,
        "models": {"base": str(tiny_models["base"]),
                   "models": {"a": str(tiny_models["a"]), "b": str(tiny_models["b_sharded"])}},
        "evaluator": {"name": "toy_slow", "sleep": sleep,
                      "paths": {k: str(tiny_models[k]) for k in ("base", "a", "b")}},
        "merge": {"baselines": [{"weight": 1.0}, {"weight": 0.5}], "bounds": {"weight": [0.0, 1.5]}},
        "sampler": {"name": "tpe"},
        "export": {"heldout_top_k": 2},
    }
    return OmegaConf.to_container(OmegaConf.merge(cfg, kw))


def main(path: str) -> int:
    from optimizer import UserError
    from optimizer.cli import fail
    from optimizer.config import Config
    from optimizer.runner import run

    cfg = OmegaConf.merge(OmegaConf.structured(Config), json.loads(Path(path).read_text()))
    barrier = os.environ.get("TOY_WORKER_BARRIER")
    if barrier:  # start together: imports done, wait for the test to let every worker go at once
        Path(f"{barrier}.{os.getpid()}.ready").touch()
        while not Path(barrier).exists():
            time.sleep(0.05)
    try:
        return run(cfg)
    except UserError as e:
        fail(str(e))  # one redacted paragraph on stderr, exit 2
        raise


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    raise SystemExit(main(sys.argv[1]))

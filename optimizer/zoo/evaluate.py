"""Score live (in-memory) models on the zoo tasks, through the optimizer's own evaluation engine
(optimizer/eval/engine.py: requests built once, lm-eval's LM and task API per call), so a zoo build, the
MoE table and a study measure a model identically."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from .layout import EXPERTS, TASKS_DIR, ZOO_TASKS, ZOO_TASKS_HELDOUT

SPLIT_TASKS = {"search": ZOO_TASKS, "heldout": ZOO_TASKS_HELDOUT}


def task_manager(zoo: Path):
    """An lm-eval TaskManager that knows the zoo tasks and reads their data from `zoo`."""
    from optimizer.eval.tasks import task_manager as manager

    # Only the zoo's own YAMLs are indexed (lm-eval's ~14k bundled ones cost ~10 s and none is needed).
    return manager([TASKS_DIR], [*ZOO_TASKS, *ZOO_TASKS_HELDOUT], metadata={"zoo_dir": str(zoo)})


class ZooScorer:
    """One HFLM around one live model, requests built once; `score` re-evaluates after in-place weight edits.

    Args:
        model: live MistralForCausalLM or MixtralForCausalLM (weights may change between calls).
        tokenizer: the zoo tokenizer.
        zoo: zoo folder holding `data/`.
        batch_size: HFLM batch size (64 keeps a 3-task split at ~1 s on CPU).

    Example:
        >>> scorer = ZooScorer(model, tok, ensure_zoo())
        >>> scorer.score("heldout")        # {"add": 0.41, "rev": 0.35, "kana": 0.52}
    """

    def __init__(self, model, tokenizer, zoo: Path, *, batch_size: int = 64, max_length: int = 128):
        from lm_eval.models.huggingface import HFLM

        from optimizer.eval.engine import Engine, prepare_task
        from optimizer.eval.tasks import load_tasks, quiet_task_builds

        # lm-eval logs every task build and request batch at INFO/WARNING; one line per trial is enough.
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        self.engine = Engine(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                                  max_length=max_length))
        manager = task_manager(zoo)
        self.prepared = {}
        for split, names in SPLIT_TASKS.items():
            tasks = load_tasks(manager, names, f"the zoo's {split} split")
            with contextlib.redirect_stderr(io.StringIO()), quiet_task_builds():  # a tqdm bar per task build
                self.prepared[split] = [prepare_task(n, tasks[n], range(len(tasks[n].eval_docs))) for n in names]

    @property
    def lm(self):
        return self.engine.lm

    def score(self, split: str) -> dict[str, float]:
        """Accuracy per skill ("add", "rev", "kana") on `split` ("search" or "heldout")."""
        from optimizer.eval.engine import score

        runs = score(self.engine, self.prepared[split])
        names = SPLIT_TASKS[split]
        return {skill: float(runs[name].aggregate()["acc,none"]) for skill, name in zip(EXPERTS, names, strict=True)}

"""Score live (in-memory) models on the zoo tasks through lm-eval, exactly as the optimizer measures them."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from .layout import EXPERTS, TASKS_DIR, ZOO_TASKS, ZOO_TASKS_HELDOUT

SPLIT_TASKS = {"search": ZOO_TASKS, "heldout": ZOO_TASKS_HELDOUT}


def task_manager(zoo: Path):
    """An lm-eval TaskManager that knows the zoo tasks and reads their data from `zoo`."""
    from lm_eval.tasks import TaskManager

    # include_defaults=False: indexing lm-eval's ~14k bundled YAMLs costs ~10 s and the zoo needs none.
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"zoo_dir": str(zoo)})


class ZooScorer:
    """One HFLM around one live model, tasks loaded once; `score` re-evaluates after in-place weight edits.

    Args:
        model: live MistralForCausalLM (weights may change between calls).
        tokenizer: the zoo tokenizer.
        zoo: zoo folder holding `data/`.
        batch_size: HFLM batch size (64 keeps a 3-task split at ~1-2 s on CPU).

    Example:
        >>> scorer = ZooScorer(model, tok, ensure_zoo())
        >>> scorer.score("heldout")        # {"add": 0.41, "rev": 0.35, "kana": 0.52}
    """

    def __init__(self, model, tokenizer, zoo: Path, *, batch_size: int = 64, max_length: int = 128):
        from lm_eval.models.huggingface import HFLM

        # lm-eval logs every task build and request batch at INFO/WARNING; one line per trial is enough.
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        manager = task_manager(zoo)
        self.tasks = {split: manager.load(list(names)) for split, names in SPLIT_TASKS.items()}

    def score(self, split: str) -> dict[str, float]:
        """Accuracy per skill ("add", "rev", "kana") on `split` ("search" or "heldout")."""
        # evaluator.evaluate, not simple_evaluate: the latter also collects git and environment info,
        # which costs seconds per call and a trial runs this every time.
        from lm_eval.evaluator import evaluate

        # lm-eval draws tqdm bars on stderr for every call; they would bury the caller's own display.
        with contextlib.redirect_stderr(io.StringIO()):
            out = evaluate(self.lm, self.tasks[split], bootstrap_iters=0, log_samples=False, verbosity="ERROR")
        results = out["results"]
        names = SPLIT_TASKS[split]
        return {skill: float(results[name]["acc,none"]) for skill, name in zip(EXPERTS, names, strict=True)}

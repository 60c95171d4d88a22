"""Build the zoo into a temporary folder beside its destination, check it, then rename it into place."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import optimizer.zoo.skills as skills

from .layout import (
    EXPERTS,
    MANIFEST,
    MODELS,
    MOE_EXPERTS,
    RECIPE_VERSION,
    SKILL_OF,
    ZOO_TASKS,
    ZOO_TASKS_HELDOUT,
    is_built,
)
from .mergeability import WEIGHTS, Table, mean, merge_rows, score_state_dicts
from .progress import BuildProgress
from .recipe import RECIPE, Recipe, finetune_expert, pretrain_base
from .skills import SKILLS, eval_splits
from .tokenizer import train_tokenizer


class ZooBuildError(RuntimeError):
    """The recipe produced a zoo that cannot serve the demo (an expert does not beat the base)."""


def build_zoo(root: Path, *, force: bool = False, progress: bool = False, recipe: Recipe = RECIPE) -> dict:
    """Build the zoo at `root` (atomically) and return its manifest.

    Concurrent callers wait on a lock file and reuse the zoo the first one built.

    Args:
        root: destination folder.
        force: rebuild even if `root` holds a current zoo.
        progress: show a live progress display.
        recipe: hyper-parameters (the default is what `RECIPE_VERSION` names).
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.with_name(root.name + ".lock")):
        if not force and is_built(root):
            return json.loads((root / MANIFEST).read_text())
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
        try:
            manifest = _build_into(tmp, recipe, progress)
            _replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _replace(tmp: Path, root: Path) -> None:
    # rename is atomic; an old zoo is moved aside first so `root` never holds a half-written tree.
    old = None
    if root.exists():
        old = root.with_name(f".{root.name}.old-{time.time_ns()}")
        root.rename(old)
    tmp.rename(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    # On this shared 2-core machine two OpenMP threads per process ran 7x slower than one when other
    # processes were busy; matrices of width 128 gain little from threads anyway.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_data(tmp: Path, recipe: Recipe) -> set[str]:
    """Write `data/<skill>/<split>.jsonl`; return the keys of all evaluation items."""
    keys: set[str] = set()
    for skill in SKILLS:
        folder = tmp / "data" / skill
        folder.mkdir(parents=True)
        for split, items in eval_splits(skill, recipe.seed, recipe.n_eval).items():
            lines = (json.dumps(item.to_doc(), ensure_ascii=False) + "\n" for item in items)
            (folder / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
            keys |= {item.key for item in items}
    return keys


def _build_into(tmp: Path, recipe: Recipe, show: bool) -> dict:
    start = time.perf_counter()
    with _single_thread(), BuildProgress(recipe, enabled=show) as bar:
        tok = train_tokenizer(recipe.seed)
        exclude = _write_data(tmp, recipe)
        base = pretrain_base(tok, exclude, recipe, on_step=bar.stage("pretrain base", recipe.base_steps))
        experts = {
            skill: finetune_expert(base, tok, skill, exclude, recipe,
                                   on_step=bar.stage(f"fine-tune {skill}", recipe.expert_steps))
            for skill in EXPERTS
        }
        # Trained last, each from its own fresh seeded data generator: the models above are what v2 built.
        mlp_experts = {
            name: finetune_expert(base, tok, SKILL_OF[name], exclude, recipe, mlp_only=True,
                                  on_step=bar.stage(f"fine-tune {name}", recipe.expert_steps))
            for name in MOE_EXPERTS
        }
        models = {"base": base, **experts, **mlp_experts}
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' "Writing model shards" bars
            for name, model in models.items():
                model.save_pretrained(tmp / name)
                tok.save_pretrained(tmp / name)
        states = {name: model.state_dict() for name, model in models.items()}
        states.update(merge_rows(base, experts, WEIGHTS))
        table = score_state_dicts(states, base, tok, tmp, on_row=bar.stage("evaluate (lm-eval)", len(states)))
    check_experts(table)
    manifest = _manifest(recipe, table, base, time.perf_counter() - start)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_experts(table: Table) -> None:
    """Raise ZooBuildError unless every expert (full and MLP-only) beats the base on its own skill on both
    splits."""
    bad = [
        f"{name} on {split}: expert {table[name][split][skill]:.3f} <= base {table['base'][split][skill]:.3f}"
        for name, skill in SKILL_OF.items()
        for split in ("search", "heldout")
        if table[name][split][skill] <= table["base"][split][skill]
    ]
    if bad:
        raise ZooBuildError("zoo recipe is broken, an expert does not beat the base: " + "; ".join(bad))


def _manifest(recipe: Recipe, table: Table, base, seconds: float) -> dict:
    import transformers

    return {
        "recipe_version": RECIPE_VERSION,
        "recipe": dataclasses.asdict(recipe),
        "skills": {
            "rev_lengths": skills.REV_LENGTHS, "rev_base_lengths": skills.REV_BASE_LENGTHS,
            "base_hard_share": skills.BASE_HARD_SHARE, "kana_words": len(skills.kana_lexicon(recipe.seed)),
        },
        "models": {name: name for name in MODELS},
        "moe_experts": {name: {"skill": SKILL_OF[name], "trainable": "mlp.*", "lr": recipe.mlp_expert_lr}
                        for name in MOE_EXPERTS},
        "parameters": sum(p.numel() for p in base.parameters()),
        "tasks": {"search": list(ZOO_TASKS), "heldout": list(ZOO_TASKS_HELDOUT)},
        "accuracy": {
            split: {row: {**scores[split], "mean": mean(scores[split])} for row, scores in table.items()}
            for split in ("search", "heldout")
        },
        "build_seconds": round(seconds, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }

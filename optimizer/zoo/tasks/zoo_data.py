"""Data of the zoo lm-eval tasks, read at run time from the built zoo (`<zoo>/data/<skill>/<split>.jsonl`).

lm-eval calls these through `custom_dataset: !function zoo_data.<skill>` with the task's metadata as
keyword arguments; a `zoo_dir` entry there (``TaskManager(metadata={"zoo_dir": ...})``) points at a zoo
built with `--out`, otherwise `optimizer.zoo.zoo_dir()` is used.
"""

from __future__ import annotations

import json
from pathlib import Path

from optimizer import zoo as _zoo

SPLITS = ("search", "heldout")


def load(skill: str, zoo_dir: str | None = None) -> dict:
    """Both splits of `skill` as `datasets.Dataset`s.

    Args:
        skill: "add", "rev" or "kana".
        zoo_dir: zoo folder; default `optimizer.zoo.zoo_dir()`.
    """
    import datasets

    root = Path(zoo_dir) if zoo_dir else _zoo.zoo_dir()
    out = {}
    for split in SPLITS:
        path = root / "data" / skill / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: build the demo zoo with `python -m optimizer.zoo`")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        out[split] = datasets.Dataset.from_list(rows)
    return out


def add(zoo_dir: str | None = None, **_metadata) -> dict:
    return load("add", zoo_dir)


def rev(zoo_dir: str | None = None, **_metadata) -> dict:
    return load("rev", zoo_dir)


def kana(zoo_dir: str | None = None, **_metadata) -> dict:
    return load("kana", zoo_dir)

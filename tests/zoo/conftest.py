"""The real demo zoo, built once per machine (cached under $MERGE_OPTIMIZER_CACHE) and shared by the tests.

`independent_scores` re-scores every model folder of the built zoo, and the uniform merge the README quotes,
with `zoo_independent.py` (plain torch, not lm-eval and not `optimizer.zoo.evaluate`), so the manifest's
numbers and the models on disk are checked against a second implementation of the tasks' `acc`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

# Helpers live in zoo_independent (a unique module name: several test folders have a conftest.py).
sys.path.insert(0, str(Path(__file__).parent))
from zoo_independent import SKILL_KIND, SPLITS, accuracy, read_split, uniform_merge  # noqa: E402

MERGE_ROW = "ta w=0.5"  # the manifest row of the uniform task-arithmetic merge with all weights 0.5


@pytest.fixture(scope="session")
def zoo_root() -> Path:
    """Folder of the built zoo (first run builds it: ~2-3 min on 2 CPU cores)."""
    from optimizer.zoo import ensure_zoo

    return ensure_zoo()


@pytest.fixture(scope="session")
def zoo_manifest(zoo_root: Path) -> dict:
    from optimizer.zoo import MANIFEST

    return json.loads((zoo_root / MANIFEST).read_text())


@pytest.fixture(scope="session")
def zoo_tokenizer(zoo_root: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(zoo_root / "base")


@pytest.fixture(scope="session")
def independent_scores(zoo_root: Path, zoo_tokenizer) -> dict:
    """row -> split -> skill -> acc for every model folder and MERGE_ROW (~30 s on a busy 2-core machine)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from optimizer.zoo import EXPERTS, MODELS

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # width-128 matmuls: a second thread only adds hand-offs on a busy machine
    try:
        model = AutoModelForCausalLM.from_pretrained(zoo_root / "base", dtype=torch.float32).eval()
        states = {name: load_file(str(zoo_root / name / "model.safetensors")) for name in MODELS}
        states[MERGE_ROW] = uniform_merge(states["base"], [states[e] for e in EXPERTS], 0.5)
        data = {(skill, split): read_split(zoo_root, skill, split) for skill in SKILL_KIND for split in SPLITS}
        table: dict = {}
        for row, state in states.items():
            model.load_state_dict(state)  # strict: every tensor of the architecture comes from the folder
            table[row] = {split: {skill: accuracy(model, zoo_tokenizer, data[(skill, split)], kind)
                                  for skill, kind in SKILL_KIND.items()} for split in SPLITS}
        return table
    finally:
        torch.set_num_threads(before)

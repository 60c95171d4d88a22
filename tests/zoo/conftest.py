"""The real demo zoo, built once per machine (cached under $MERGE_OPTIMIZER_CACHE) and shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


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

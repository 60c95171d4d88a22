"""Public API of optimizer.zoo that needs no built zoo: paths, references, light imports, atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import optimizer.zoo as zoo
from optimizer import UserError


def test_zoo_dir_defaults_and_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("MERGE_OPTIMIZER_ZOO", raising=False)
    monkeypatch.setenv("MERGE_OPTIMIZER_CACHE", str(tmp_path))
    assert zoo.zoo_dir() == tmp_path / "zoo" / f"v{zoo.RECIPE_VERSION}"
    monkeypatch.setenv("MERGE_OPTIMIZER_ZOO", str(tmp_path / "elsewhere"))
    assert zoo.zoo_dir() == tmp_path / "elsewhere"


def test_constants():
    assert zoo.EXPERTS == ("add", "rev", "kana")
    assert zoo.MOE_EXPERTS == ("add_mlp", "rev_mlp", "kana_mlp")
    assert zoo.MODELS == ("base", *zoo.EXPERTS, *zoo.MOE_EXPERTS)
    assert zoo.SKILL_OF == {"add": "add", "rev": "rev", "kana": "kana",
                            "add_mlp": "add", "rev_mlp": "rev", "kana_mlp": "kana"}
    assert zoo.ZOO_TASKS == ("zoo_add", "zoo_rev", "zoo_kana")
    assert (zoo.TASKS_DIR / "zoo_data.py").is_file()
    for name in (*zoo.ZOO_TASKS, *zoo.ZOO_TASKS_HELDOUT):
        assert (zoo.TASKS_DIR / f"{name}.yaml").is_file()


def test_resolve_model_ref_passthrough_and_errors():
    assert zoo.resolve_model_ref("/some/folder") == "/some/folder"
    assert zoo.resolve_model_ref("mistralai/Mistral-7B-v0.1") == "mistralai/Mistral-7B-v0.1"
    with pytest.raises(UserError, match="zoo://base"):
        zoo.resolve_model_ref("zoo://nope")


def test_resolve_model_ref_uses_existing_zoo(monkeypatch, tmp_path):
    (tmp_path / zoo.MANIFEST).write_text(json.dumps({"recipe_version": zoo.RECIPE_VERSION}))
    monkeypatch.setenv("MERGE_OPTIMIZER_ZOO", str(tmp_path))
    assert zoo.resolve_model_ref("zoo://kana") == str(tmp_path / "kana")
    for name in zoo.MOE_EXPERTS:
        assert zoo.resolve_model_ref(f"zoo://{name}") == str(tmp_path / name)


def test_is_built_checks_recipe_version(tmp_path):
    assert not zoo.is_built(tmp_path)
    (tmp_path / zoo.MANIFEST).write_text(json.dumps({"recipe_version": zoo.RECIPE_VERSION - 1}))
    assert not zoo.is_built(tmp_path)
    (tmp_path / zoo.MANIFEST).write_text("{broken")
    assert not zoo.is_built(tmp_path)


def test_import_is_light():
    code = "import sys, optimizer.zoo; print(sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(zoo.__file__).parents[2])
    assert out.stdout.strip() == "[]"


def test_replace_swaps_atomically(tmp_path):
    from optimizer.zoo.build import _replace

    root, new = tmp_path / "zoo", tmp_path / "new"
    root.mkdir()
    (root / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    _replace(new, root)
    assert [p.name for p in tmp_path.iterdir()] == ["zoo"]
    assert [p.name for p in root.iterdir()] == ["new.txt"]


def test_check_experts_raises_with_reason():
    from optimizer.zoo.build import ZooBuildError, check_experts

    row = {"add": 0.5, "rev": 0.5, "kana": 0.5}
    table = {name: {"search": dict(row), "heldout": dict(row)} for name in zoo.MODELS}
    for name, skill in zoo.SKILL_OF.items():
        for split in ("search", "heldout"):
            table[name][split][skill] = 0.9
    check_experts(table)
    table["rev"]["heldout"]["rev"] = 0.4
    with pytest.raises(ZooBuildError, match="rev on heldout"):
        check_experts(table)
    table["rev"]["heldout"]["rev"] = 0.9
    table["kana_mlp"]["search"]["kana"] = 0.5
    with pytest.raises(ZooBuildError, match="kana_mlp on search"):
        check_experts(table)

"""End to end: the real CLI on the demo zoo as the README runs it (default sampler CMA-ES, few trials), a
resume, then what a user does with the result: load `best/` with transformers, compare its search score
with the base's (as exported, and recomputed by an independent scorer), and re-apply `best/recipe.yaml`
with `python -m optimizer.merge` to the same tensors, bit for bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ONE_ITEM = 1 / 150 + 1e-9


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=900)


def independent_search_score(folder: Path, zoo: Path) -> dict[str, float]:
    """Accuracy per zoo task on the search split by tests/zoo/zoo_independent.py (plain torch, not lm-eval)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "tests" / "zoo"))
    from zoo_independent import SKILL_KIND, accuracy, read_split

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    return {f"zoo_{s}": accuracy(model, tok, read_split(zoo, s, "search"), k) for s, k in SKILL_KIND.items()}


def test_cli_on_demo_zoo_runs_resumes_and_exports(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from optimizer.zoo import ensure_zoo

    zoo = ensure_zoo()  # built once per machine (cached); the CLI would build it too
    args = ["study_name=e2e", f"run_root={tmp_path}", "threads=1", "export.heldout_top_k=2"]
    first = cli("optimizer", *args, "n_trials=3")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[  3/3]" in first.stdout and "optuna-dashboard sqlite:///" in first.stdout
    second = cli("optimizer", *args, "n_trials=4")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 finished trials, target 4" in second.stdout

    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path}/e2e/study.db")
    assert study.user_attrs["config"]["sampler"]["name"] == "cmaes"  # the default, what the demo runs
    assert len(study.trials) == 4
    assert [t.user_attrs.get("baseline") for t in study.trials[:2]] == ["weight=1.0", "weight=0.5"]
    assert set(study.trials[0].user_attrs["scores"]) == {"zoo_add", "zoo_rev", "zoo_kana"}
    best = tmp_path / "e2e" / "best"
    scores = json.loads((best / "scores.json").read_text())
    assert set(scores["references"]) == {"base", "add", "rev", "kana"}
    assert scores["best_expert"]["name"] in ("add", "rev", "kana")
    assert "merge_method: task_arithmetic" in (best / "recipe.yaml").read_text()

    # best/ is a plain Hugging Face folder of the zoo's architecture
    model = AutoModelForCausalLM.from_pretrained(best)
    assert type(model).__name__ == "MistralForCausalLM"
    ignore = {"architectures": None, "_name_or_path": None}
    assert model.config.to_dict() | ignore == AutoConfig.from_pretrained(zoo / "base").to_dict() | ignore
    assert AutoTokenizer.from_pretrained(best)("12+35=")["input_ids"] == \
        AutoTokenizer.from_pretrained(zoo / "base")("12+35=")["input_ids"]

    # its search score beats the base's, as exported and as recomputed from the folders
    chosen = next(t for t in study.trials if t.number == scores["best"]["trial"])
    exported, base = scores["best"]["search"], scores["references"]["base"]["search"]
    assert exported["objective"] == pytest.approx(chosen.value) and exported["objective"] > base["objective"]
    again, again_base = independent_search_score(best, zoo), independent_search_score(zoo / "base", zoo)
    assert again == pytest.approx(exported["tasks"], abs=ONE_ITEM)
    assert again_base == pytest.approx(base["tasks"], abs=ONE_ITEM)
    assert sum(again.values()) > sum(again_base.values())

    # the recipe, re-applied by the merge CLI, gives the exported tensors bit for bit
    merged = cli("optimizer.merge", str(best / "recipe.yaml"), str(tmp_path / "remerged"))
    assert merged.returncode == 0, merged.stderr[-3000:]
    ours = load_file(str(best / "model.safetensors"))
    theirs = {}
    for f in sorted((tmp_path / "remerged").glob("*.safetensors")):
        theirs.update(load_file(str(f)))
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype and torch.equal(t, theirs[name]), name

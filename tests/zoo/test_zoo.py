"""The built zoo: folders, manifest, experts beat the base, MLP-only experts touch only MLPs, and the lm-eval
tasks on both splits.

Accuracies are never taken from the manifest on trust: `independent_scores` (conftest.py) re-scores every
model folder with its own implementation of the tasks' `acc`, and one skill is re-scored with plain lm-eval
(`lm_eval.evaluator.evaluate`, not the optimizer's engine), so the manifest, the models on disk and the
scorer the builder used are checked against each other. Scoring speed is measured in
benchmarks/zoo_scoring.py, not asserted here.
"""

from __future__ import annotations

import pytest

from optimizer.zoo import (
    EXPERTS,
    MODELS,
    MOE_EXPERTS,
    SKILL_OF,
    TASKS_DIR,
    ZOO_TASKS,
    ZOO_TASKS_HELDOUT,
    resolve_model_ref,
)

SPLITS = ("search", "heldout")
ONE_ITEM = 1 / 150 + 1e-9  # tolerance: one item of a 150-item split (float rounding may flip a near-tie)


def test_folders_are_plain_hf_checkpoints(zoo_root):
    for name in MODELS:
        folder = zoo_root / name
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        assert (folder / "tokenizer.json").is_file()
        assert resolve_model_ref(f"zoo://{name}") == str(folder)
    for skill in EXPERTS:
        for split in SPLITS:
            assert (zoo_root / "data" / skill / f"{split}.jsonl").is_file()


def test_models_load(zoo_root, zoo_manifest):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo_root / "base")
    assert model.config.model_type == "mistral" and model.config.hidden_size == 128
    n = sum(p.numel() for p in model.parameters())
    assert 0.7e6 < n < 0.8e6 and zoo_manifest["parameters"] == n


@pytest.mark.parametrize("row", [*MODELS, "ta w=0.5"])
def test_manifest_matches_independent_scoring(zoo_manifest, independent_scores, row):
    for split in SPLITS:
        stated = zoo_manifest["accuracy"][split][row]
        got = independent_scores[row][split]
        assert got == pytest.approx({s: stated[s] for s in got}, abs=ONE_ITEM), (row, split)
        assert stated["mean"] == pytest.approx(sum(stated[s] for s in EXPERTS) / len(EXPERTS))


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("name", [*EXPERTS, *MOE_EXPERTS])
def test_expert_beats_base_on_own_skill(independent_scores, name, split):
    acc, skill = independent_scores, SKILL_OF[name]
    assert acc[name][split][skill] > acc["base"][split][skill] + 0.05  # a skill, not a rounding difference


def test_manifest_lists_every_model(zoo_manifest):
    assert list(zoo_manifest["models"]) == list(MODELS)
    assert {n: e["skill"] for n, e in zoo_manifest["moe_experts"].items()} == {n: SKILL_OF[n] for n in MOE_EXPERTS}


@pytest.mark.parametrize("name", MOE_EXPERTS)
def test_mlp_expert_differs_from_base_only_in_mlps(zoo_root, name):
    from safetensors.torch import load_file

    base = load_file(zoo_root / "base" / "model.safetensors")
    expert = load_file(zoo_root / name / "model.safetensors")
    assert base.keys() == expert.keys()
    changed = {k for k in base if not _same_bits(base[k], expert[k])}
    assert changed == {k for k in base if ".mlp." in k}  # every MLP trained; all else the base's, bit for bit


def _same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def test_uniform_merge_beats_every_expert_on_the_search_split(independent_scores):
    """What the demo search needs: the uniform merge (recomputed here) beats every single expert on the
    3-skill mean of the split it searches on. (The held-out margin depends on the build; the README's
    table reports it.)"""
    def mean(row):
        return sum(row[s] for s in EXPERTS) / len(EXPERTS)

    merge = mean(independent_scores["ta w=0.5"]["search"])
    assert merge > max(mean(independent_scores[e]["search"]) for e in EXPERTS)
    assert merge > mean(independent_scores["base"]["search"])


def test_tasks_load_through_task_manager(zoo_root):
    from lm_eval.tasks import TaskManager
    from zoo_independent import read_split

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"zoo_dir": str(zoo_root)})
    loaded = manager.load([*ZOO_TASKS, *ZOO_TASKS_HELDOUT])["tasks"]
    for skill, name in zip(EXPERTS, ZOO_TASKS, strict=True):
        search, heldout = loaded[name].eval_docs, loaded[f"{name}_heldout"].eval_docs
        assert [d["key"] for d in search] == [r["key"] for r in read_split(zoo_root, skill, "search")]
        assert [d["key"] for d in heldout] == [r["key"] for r in read_split(zoo_root, skill, "heldout")]
        assert len(search) == len(heldout) == 150
        assert not {d["key"] for d in search} & {d["key"] for d in heldout}


def test_plain_lm_eval_reproduces_the_manifest_for_one_skill(zoo_root, zoo_manifest, zoo_tokenizer):
    """lm-eval itself (HFLM + evaluate, none of the optimizer's scoring code) on the kana expert."""
    import contextlib
    import io

    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo_root / "kana").eval()
    lm = HFLM(pretrained=model, tokenizer=zoo_tokenizer, batch_size=64, max_length=128)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"zoo_dir": str(zoo_root)})
    for split, task in (("search", "zoo_kana"), ("heldout", "zoo_kana_heldout")):
        with contextlib.redirect_stderr(io.StringIO()):
            out = evaluate(lm, manager.load([task]), bootstrap_iters=0, verbosity="ERROR")
        assert out["results"][task]["acc,none"] == pytest.approx(zoo_manifest["accuracy"][split]["kana"]["kana"],
                                                                  abs=ONE_ITEM)


def test_zoo_scorer_reproduces_the_manifest(zoo_root, zoo_manifest, zoo_tokenizer):
    """The builder's scorer on a model loaded from disk gives what the builder wrote from memory."""
    from transformers import AutoModelForCausalLM

    from optimizer.zoo.evaluate import ZooScorer

    model = AutoModelForCausalLM.from_pretrained(zoo_root / "rev").eval()
    scorer = ZooScorer(model, zoo_tokenizer, zoo_root)
    for split in SPLITS:
        expected = zoo_manifest["accuracy"][split]["rev"]
        assert scorer.score(split) == pytest.approx({k: expected[k] for k in EXPERTS}, abs=ONE_ITEM)


def test_cli_on_built_zoo_prints_tables(zoo_root, capsys):
    from optimizer.zoo.__main__ import main

    assert main(["--out", str(zoo_root)]) == 0
    out = capsys.readouterr().out
    assert "heldout" in out and "ta w=0.5" in out and "zoo ready" in out

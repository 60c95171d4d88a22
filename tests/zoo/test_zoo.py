"""The built zoo: folders, manifest, experts beat the base, MLP-only experts touch only MLPs, and the lm-eval
tasks on both splits."""

from __future__ import annotations

import time

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


def test_folders_are_plain_hf_checkpoints(zoo_root):
    for name in MODELS:
        folder = zoo_root / name
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        assert (folder / "tokenizer.json").is_file()
        assert resolve_model_ref(f"zoo://{name}") == str(folder)
    for skill in EXPERTS:
        for split in ("search", "heldout"):
            assert (zoo_root / "data" / skill / f"{split}.jsonl").is_file()


def test_models_load(zoo_root):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo_root / "base")
    assert model.config.model_type == "mistral" and model.config.hidden_size == 128
    assert 0.7e6 < sum(p.numel() for p in model.parameters()) < 0.8e6


@pytest.mark.parametrize("split", ["search", "heldout"])
@pytest.mark.parametrize("name", [*EXPERTS, *MOE_EXPERTS])
def test_expert_beats_base_on_own_skill(zoo_manifest, name, split):
    acc, skill = zoo_manifest["accuracy"][split], SKILL_OF[name]
    assert acc[name][skill] > acc["base"][skill]


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


def test_uniform_merge_beats_every_expert(zoo_manifest):
    acc = zoo_manifest["accuracy"]["heldout"]
    best_merge = max(row["mean"] for name, row in acc.items() if name.startswith("ta "))
    assert best_merge > max(acc[e]["mean"] for e in EXPERTS)


def test_tasks_load_through_task_manager(zoo_root):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"zoo_dir": str(zoo_root)})
    loaded = manager.load([*ZOO_TASKS, *ZOO_TASKS_HELDOUT])["tasks"]
    for name in ZOO_TASKS:
        search, heldout = loaded[name].eval_docs, loaded[f"{name}_heldout"].eval_docs
        assert len(search) == len(heldout) == 150
        assert not {d["key"] for d in search} & {d["key"] for d in heldout}


def test_both_splits_evaluate_and_match_manifest(zoo_root, zoo_manifest, zoo_tokenizer):
    from transformers import AutoModelForCausalLM

    from optimizer.zoo.evaluate import ZooScorer

    model = AutoModelForCausalLM.from_pretrained(zoo_root / "kana").eval()
    scorer = ZooScorer(model, zoo_tokenizer, zoo_root)
    for split in ("search", "heldout"):
        start = time.perf_counter()
        scores = scorer.score(split)
        assert time.perf_counter() - start < 30  # ~1 s when the machine is not busy
        expected = zoo_manifest["accuracy"][split]["kana"]
        assert scores == pytest.approx({k: expected[k] for k in EXPERTS}, abs=0.02)


def test_cli_on_built_zoo_prints_tables(zoo_root, capsys):
    from optimizer.zoo.__main__ import main

    assert main(["--out", str(zoo_root)]) == 0
    out = capsys.readouterr().out
    assert "heldout" in out and "ta w=0.5" in out and "zoo ready" in out

"""The JGLUE preset for real, offline: the zoo's kana skill in JGLUE's schema, read by mainline lm-eval's
`ja_leaderboard_jcommonsenseqa` (its prompt, 3-shot sampling and acc) with only `dataset_path` overridden."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optimizer.zoo.jglue import CONFIG, jglue_row, write_jcommonsenseqa

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def fake_zoo(root: Path) -> Path:
    rows = {"search": [("にせ は なに?", ["のりもの", "ばしょ", "どうぶつ", "どうぐ", "たべもの"], 1)],
            "heldout": [("どうぐ は どれ?", ["おれめ", "とへは", "せむと", "りうる", "ましの"], 0),
                        ("ゆき は なに?", ["どうぶつ", "ばしょ", "たべもの", "どうぐ", "のりもの"], 4)]}
    (root / "data" / "kana").mkdir(parents=True)
    for split, items in rows.items():
        lines = [json.dumps({"prompt": f"もんだい:{q}\nせんたくし:{','.join(c)}\nこたえ:", "answer": c[label],
                             "choices": c, "label": label}, ensure_ascii=False) for q, c, label in items]
        (root / "data" / "kana" / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_copy_is_in_jglue_schema_and_layout(tmp_path):
    out = write_jcommonsenseqa(tmp_path / "jglue", fake_zoo(tmp_path / "zoo"))
    code = (f"import datasets, json; d = datasets.load_dataset({str(out)!r}, {CONFIG!r}); "
            "print(json.dumps({s: [dict(r) for r in d[s]] for s in d}, ensure_ascii=False))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **OFFLINE},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(data) == ["train", "validation"]
    assert data["train"] == [{"q_id": 0, "question": "にせ は なに?", "choice0": "のりもの", "choice1": "ばしょ",
                              "choice2": "どうぶつ", "choice3": "どうぐ", "choice4": "たべもの", "label": 1}]
    assert [r["q_id"] for r in data["validation"]] == [1, 2] and data["validation"][1]["label"] == 4


def test_rows_that_are_not_kana_questions_are_refused():
    with pytest.raises(ValueError, match="not a zoo kana row"):
        jglue_row(0, {"prompt": "12+35=", "choices": [], "label": -1})


RUN_PRESET = r"""
import json, sys
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from optimizer.cli import CONF_DIR
from optimizer.config import register_configs
from optimizer.eval import build_evaluator
from optimizer.zoo import ensure_zoo
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
data, limit = sys.argv[1], int(sys.argv[2])
register_configs()
with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
    plain = compose("config", overrides=["evaluator=jglue"])
    # the documented override: only the data location (and, for test time, the size) change
    cfg = compose("config", overrides=["evaluator=jglue", f"evaluator.tasks.0.dataset_path={data}",
                                       f"evaluator.tasks.0.limit={limit}"])
preset = OmegaConf.to_container(cfg.evaluator, resolve=True)
task = preset["tasks"][0]
assert task["name"] == "ja_leaderboard_jcommonsenseqa", task
preset["tasks"] = [task]  # the other JGLUE tasks have no local copy here
ev = build_evaluator(OmegaConf.create(preset), {"device": torch.device("cpu"), "run_dir": ".", "seed": 0})
ev.validate()
t = ev.tasks_for("search")["ja_leaderboard_jcommonsenseqa"]
doc = t.test_docs()[0]
zoo = ensure_zoo()
out = {"preset_task": OmegaConf.to_container(plain.evaluator.tasks[0]), "dataset_path": t.config.dataset_path, "dataset_name": t.config.dataset_name,
       "num_fewshot": t.config.num_fewshot, "fewshot_split": t.config.fewshot_split,
       "metrics": [m["metric"] for m in t.config.metric_list], "description": t.config.description,
       "context": t.fewshot_context(doc, t.config.num_fewshot), "question": doc["question"],
       "choices": t.doc_to_choice(doc), "n_search": len(t.test_docs())}
for name in ("kana", "base"):
    model = AutoModelForCausalLM.from_pretrained(zoo / name).eval()
    tok = AutoTokenizer.from_pretrained(zoo / name)
    for split in ev.splits():
        out[f"{name}/{split}"] = ev.evaluate(model, tok, split).tasks
ev.close()
print("RESULT " + json.dumps(out, ensure_ascii=False))
"""


def test_mainline_jcommonsenseqa_runs_over_the_local_copy_offline(tmp_path):
    """The preset's JCommonsenseQA entry (splits, 3 shots) on mainline lm-eval's task, offline."""
    from optimizer.zoo import ensure_zoo

    ensure_zoo()
    data = write_jcommonsenseqa(tmp_path / "jglue")
    r = subprocess.run([sys.executable, "-c", RUN_PRESET, str(data), "20"], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, **OFFLINE, "TQDM_DISABLE": "1"}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert out["preset_task"]["search_split"] == "train" and out["preset_task"]["heldout_split"] == "validation"
    assert out["preset_task"]["dataset_path"] is None  # the preset reads Rakuten/JGLUE unless pointed elsewhere
    assert out["dataset_path"] == str(data) and out["dataset_name"] == "JCommonsenseQA"
    assert out["num_fewshot"] == 3 and out["fewshot_split"] == "train" and out["metrics"] == ["acc"]
    # lm-eval's own prompt: its description, 3 solved examples from train, then this question's choices
    assert out["context"].startswith(out["description"]) and out["description"].startswith("以下は、タスクを説明する")
    assert out["context"].count("### 指示：") == 4 and out["context"].rstrip().endswith("### 応答：")
    assert out["question"] in out["context"] and len(out["choices"]) == 5
    assert all(f"- {c}\n" in out["context"] for c in out["choices"])
    assert out["n_search"] == 150  # the whole train split; the limit picks the scored items
    for key in ("kana/search", "kana/heldout", "base/search", "base/heldout"):
        acc = out[key]["ja_leaderboard_jcommonsenseqa"]
        assert 0.0 <= acc <= 1.0 and (acc * 20) == pytest.approx(round(acc * 20)), (key, acc)  # k of 20 items


def test_a_missing_local_copy_is_named_before_lm_eval_runs(tmp_path):
    from optimizer import UserError
    from optimizer.eval.lm_eval import TaskSpec, dataset_location

    with pytest.raises(UserError, match=r"dataset_path='/no/such/JGLUE', which is not a folder"):
        dataset_location(TaskSpec(name="ja_leaderboard_jnli", dataset_path="/no/such/JGLUE"))
    assert dataset_location(TaskSpec(name="t", dataset_path=str(tmp_path))) == str(tmp_path)
    assert dataset_location(TaskSpec(name="t", dataset_path="Rakuten/JGLUE")) == "Rakuten/JGLUE"  # a hub id

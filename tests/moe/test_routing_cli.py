"""`python -m optimizer.routing` as users run it (a subprocess), on a saved tiny MoE.

The report it writes must be what `optimizer.moe.routing.analyse` computes in-process on the reloaded model
for the same prompts (first `--limit` of each file, `.txt` lines and `.jsonl` prompt+answer), with the
expert names read from the folder's moe.yaml; bad input exits 2 with one line naming the problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimizer.moe.build import build_from_config, save_moe
from optimizer.moe.config import load_moe_config
from optimizer.moe.routing import analyse
from tests.moe.conftest import PROMPTS, recipe

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "optimizer.routing", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def saved(zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing_cli")
    built = build_from_config(load_moe_config(recipe(zoo, experts_per_token=2, calibrate={"steps": 20})))
    return save_moe(built, tmp / "moe"), tmp


def test_cli_report_is_the_in_process_analysis(saved):
    moe, tmp = saved
    (tmp / "add.txt").write_text("\n".join(PROMPTS["add"]) + "\n\n")
    rows = [{"prompt": p.split(">")[0] + ">", "answer": p.split(">")[1]} for p in PROMPTS["up"]]
    (tmp / "up.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp / "report"
    done = cli(str(moe), "--prompts", f"add={tmp / 'add.txt'}", "--prompts", f"up={tmp / 'up.jsonl'}",
               "--limit", "4", "--out", str(out), "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(out / "routing.json") in done.stdout
    report = json.loads((out / "routing.json").read_text())
    assert (out / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = AutoModelForCausalLM.from_pretrained(moe).eval()
    tok = AutoTokenizer.from_pretrained(moe)
    sets = {"add": PROMPTS["add"][:4], "up": [r["prompt"] + r["answer"] for r in rows][:4]}
    with torch.no_grad():
        want = analyse(model, tok, sets, ["add", "rev", "up"])
    assert report["experts"] == ["add", "rev", "up"] and report["top_k"] == 2
    assert report["domains"].keys() == want["domains"].keys()
    for domain, layers in want["domains"].items():
        for got, exp in zip(report["domains"][domain], layers, strict=True):
            assert got["tokens"] == exp["tokens"]
            assert got["share"] == pytest.approx(exp["share"]) and got["repeat_top1"] == pytest.approx(exp["repeat_top1"])


def test_cli_refuses_a_dense_model(zoo, capsys):
    # what the entry point calls, in-process (an interpreter start costs more than the check)
    from optimizer.moe.routing_cli import main

    (prompts := zoo["base"].parent / "p.txt").write_text("12+35=47\n")
    assert main([str(zoo["base"]), "--prompts", f"add={prompts}"]) == 2
    err = capsys.readouterr().err
    assert "not a Mixtral" in err and "Traceback" not in err

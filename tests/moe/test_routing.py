"""Routing analysis: shares, repeat rates, chance levels, CLI output files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from optimizer.moe.build import build_from_config, save_moe
from optimizer.moe.config import load_moe_config
from optimizer.moe.router import forced_routing
from optimizer.moe.routing import analyse, layer_stats
from optimizer.moe.routing_cli import main as routing_main
from tests.moe.conftest import PROMPTS, recipe


def test_layer_stats_by_hand() -> None:
    seqs = [torch.tensor([[0, 1], [0, 2], [1, 2]]), torch.tensor([[2, 0]])]
    s = layer_stats(seqs, 3)
    assert s["share"] == pytest.approx([2 / 4, 1 / 4, 1 / 4])
    assert s["share_topk"] == pytest.approx([3 / 8, 2 / 8, 3 / 8])
    assert s["repeat_top1"] == pytest.approx(1 / 2)  # pairs (0,0) yes, (0,1) no; singleton has no pair
    assert s["repeat_topk"] == pytest.approx(1.0)  # {0,1}&{0,2}, {0,2}&{1,2}
    assert s["tokens"] == 4


@pytest.fixture(scope="module")
def built(zoo):
    return build_from_config(load_moe_config(recipe(zoo, experts_per_token=2, calibrate={"steps": 30})))


def test_analyse_shapes_and_chance(built) -> None:
    sets = {"add": PROMPTS["add"], "rev": PROMPTS["rev"]}
    rep = analyse(built.model, built.tokenizer, sets, built.cfg.expert_names)
    assert rep["experts"] == ["add", "rev", "up"] and rep["top_k"] == 2
    assert rep["chance"]["repeat_top1"] == pytest.approx(1 / 3)
    assert rep["chance"]["repeat_topk"] == pytest.approx(1 - math.comb(1, 2) / math.comb(3, 2))
    for layers in rep["domains"].values():
        assert len(layers) == 2
        for ly in layers:
            assert sum(ly["share"]) == pytest.approx(1) and sum(ly["share_topk"]) == pytest.approx(1)
            assert 0 <= ly["repeat_top1"] <= ly["repeat_topk"] <= 1
    with forced_routing(built.model, 1):
        forced = analyse(built.model, built.tokenizer, sets)
    assert all(ly["share"] == [0, 1, 0] and ly["repeat_top1"] == 1 for ly in forced["domains"]["add"])


def test_cli_writes_json_and_png(built, tmp_path, capsys) -> None:
    out = save_moe(built, tmp_path / "moe")
    (tmp_path / "add.txt").write_text("\n".join(PROMPTS["add"]))
    (tmp_path / "rev.jsonl").write_text("\n".join(json.dumps({"prompt": p[:-3], "answer": p[-3:]})
                                                  for p in PROMPTS["rev"]))
    argv = [str(out), "--prompts", f"add={tmp_path / 'add.txt'}", "--prompts", f"rev={tmp_path / 'rev.jsonl'}",
            "--out", str(tmp_path / "r"), "--device", "cpu"]
    assert routing_main(argv) == 0
    rep = json.loads((tmp_path / "r" / "routing.json").read_text())
    assert set(rep["domains"]) == {"add", "rev"} and rep["experts"] == ["add", "rev", "up"]
    assert (tmp_path / "r" / "routing.png").stat().st_size > 1000
    assert routing_main([str(out), "--prompts", "add"]) == 2
    assert "expected NAME=FILE" in capsys.readouterr().err

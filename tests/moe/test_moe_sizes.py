"""frankenMoEs of 2, 4 and 8 experts: the expert list is data, nothing assumes three.

For each size: slot e holds expert e's MLPs (forced routing to e reproduces the dense model with expert e's
MLPs, logit for logit), the calibrated router sends each domain's prompts to its own expert far above
chance, the saved folder reloads with transformers to the same logits, and a short study through the live
MoE searches one weight per expert and unit.
"""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, MistralForCausalLM

from optimizer.config import Config
from optimizer.moe.build import build_from_config, save_moe
from optimizer.moe.config import load_moe_config
from optimizer.moe.router import forced_routing
from optimizer.moe.routing import analyse, routing_accuracy
from optimizer.runner import run
from tests.moe.conftest import make_base, make_expert

# Eight domains with disjoint surface forms (the character tokenizer sees only these characters).
DOMAINS = {
    "add": ["12+35=47", "58+21=79", "33+44=77", "10+10=20", "61+27=88"],
    "rev": ["rev:abc>cba", "rev:hello>olleh", "rev:moe>eom", "rev:xyz>zyx", "rev:data>atad"],
    "up": ["UP:cat>CAT", "UP:dog>DOG", "UP:sun>SUN", "UP:tree>TREE", "UP:moon>MOON"],
    "dup": ["dup:ab>abab", "dup:x>xx", "dup:ok>okok", "dup:hi>hihi", "dup:no>nono"],
    "mul": ["3*4=12", "7*8=56", "6*6=36", "9*2=18", "5*7=35"],
    "sort": ["sort:cba>abc", "sort:dca>acd", "sort:zyx>xyz", "sort:bca>abc", "sort:fed>def"],
    "neg": ["~1010~0101", "~1100~0011", "~0001~1110", "~1111~0000", "~0110~1001"],
    "tag": ["<b>bold</b>", "<i>it</i>", "<p>para</p>", "<u>under</u>", "<s>strike</s>"],
}
SIZES = [2, 4, 8]
TEXT = ["12+35=47", "rev:abc>cba", "UP:sun>SUN", "<b>bold</b>"]


@pytest.fixture(scope="module")
def eight(tmp_path_factory, tokenizer):
    """Folders: base and eight fake fine-tunes of it (seeded noise, larger on the MLPs)."""
    root = tmp_path_factory.mktemp("moe_sizes")
    base = make_base(len(tokenizer))
    out = {"base": root / "base"}
    base.save_pretrained(out["base"])
    tokenizer.save_pretrained(out["base"])
    for i, name in enumerate(DOMAINS):
        make_expert(base, seed=100 + i).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


def recipe(models, n: int, **extra) -> dict:
    names = list(DOMAINS)[:n]
    data = {"base_model": str(models["base"]), "gate_mode": "hidden", "experts_per_token": 1,
            "calibrate": {"steps": 40, "lr": 0.05, "rounds": 1},
            "experts": [{"source_model": str(models[e]), "name": e, "positive_prompts": DOMAINS[e]}
                        for e in names]}
    return {**data, **extra}


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n}_experts")
def built(request, eight):
    return request.param, build_from_config(load_moe_config(recipe(eight, request.param)))


def ids(tok, texts):
    return tok(texts, return_tensors="pt", padding=True)


def dense_with_mlps_of(base_dir, expert_dir) -> MistralForCausalLM:
    model = MistralForCausalLM.from_pretrained(base_dir).eval()
    expert = dict(MistralForCausalLM.from_pretrained(expert_dir).named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.copy_(expert[name])
    return model


def test_layout_has_n_experts(built):
    n, moe = built
    assert moe.model.config.num_local_experts == n and moe.cfg.expert_names == list(DOMAINS)[:n]
    for layer in moe.model.model.layers:
        assert layer.mlp.gate.weight.shape[0] == n


def test_slot_e_is_expert_e(built, eight):
    n, moe = built
    batch = ids(moe.tokenizer, TEXT)
    with torch.no_grad():
        for e, name in enumerate(moe.cfg.expert_names):
            with forced_routing(moe.model, e):
                got = moe.model(**batch).logits
            want = dense_with_mlps_of(eight["base"], eight[name])(**batch).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"slot {e} ({name})")


def test_router_sends_each_domain_to_its_expert(built):
    n, moe = built
    names = moe.cfg.expert_names
    report = analyse(moe.model, moe.tokenizer, {d: DOMAINS[d] for d in names}, names)
    acc = routing_accuracy(report, {d: d for d in names})
    assert report["experts"] == names and len(acc) == n
    assert sum(acc.values()) / n > 0.5 + 0.5 / n, acc  # chance is 1/n; most tokens go the right way


def test_saved_folder_reloads_with_the_same_logits(built, tmp_path):
    n, moe = built
    out = save_moe(moe, tmp_path / f"moe{n}")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "MixtralForCausalLM" and reloaded.config.num_local_experts == n
    batch = ids(moe.tokenizer, TEXT)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, moe.model(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", SIZES)
def test_study_searches_every_expert(eight, tmp_path, n):
    cfg = OmegaConf.structured(Config)
    cfg.moe = recipe(eight, n, calibrate={"steps": 5})
    cfg.evaluator = {"name": "lm_toy"}
    cfg.merge.baselines = [{"weight": 1.0}]
    cfg.run_root, cfg.study_name, cfg.n_trials, cfg.device = str(tmp_path / "runs"), "moe", 2, "cpu"
    cfg.sampler.name = "random"
    cfg.export.references = False
    assert run(cfg) == 0
    study = optuna.load_study(study_name="moe", storage=f"sqlite:///{tmp_path}/runs/moe/study.db")
    params = study.trials[-1].params
    assert {p.split("/")[1] for p in params} == set(list(DOMAINS)[:n])
    assert len(params) == n * 2  # one weight per expert and layer (2 layers; MLPs only under shared=base)
    best = tmp_path / "runs" / "moe" / "best"
    assert AutoModelForCausalLM.from_pretrained(best).config.num_local_experts == n
    assert json.loads((best / "scores.json").read_text())["best"]["trial"] in (0, 1)

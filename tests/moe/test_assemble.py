"""Assembly: fused-tensor layout, equivalence with the dense model, in-place writes, save/reload, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralForCausalLM

from optimizer.moe.__main__ import main as moe_main
from optimizer.moe.assemble import build_moe, write_expert_mlps, write_shared
from optimizer.moe.build import build_from_config, save_moe
from optimizer.moe.config import load_moe_config
from optimizer.moe.layout import expert_views, is_mlp
from optimizer.moe.router import forced_routing
from tests.moe.conftest import make_base, make_expert, recipe

TEXT = ["12+35=47", "rev:hello>olleh"]


def logits(model, tokenizer, texts=TEXT):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_fused_layout_matches_installed_transformers(tokenizer) -> None:
    """The names and shapes DESIGN §7 relies on, checked against the installed MixtralForCausalLM."""
    base = make_base(len(tokenizer))
    moe = build_moe(base.config, base.state_dict(), [base.state_dict()] * 3, experts_per_token=2)
    shapes = {n: tuple(p.shape) for n, p in moe.named_parameters()}
    h, i = base.config.hidden_size, base.config.intermediate_size
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == (3, 2 * i, h)
    assert shapes["model.layers.0.mlp.experts.down_proj"] == (3, h, i)
    assert shapes["model.layers.0.mlp.gate.weight"] == (3, h)
    views = expert_views(moe, 1)
    for name, t in base.state_dict().items():
        if is_mlp(name):
            assert torch.equal(views[name], t)


@pytest.mark.parametrize("top_k, tie", [(1, False), (2, False), (2, True)])
def test_moe_of_identical_experts_reproduces_the_dense_model(tokenizer, top_k, tie) -> None:
    base = make_base(len(tokenizer), tie=tie)
    state = base.state_dict()
    moe = build_moe(base.config, state, [state] * 3, experts_per_token=top_k)
    torch.manual_seed(1)
    for layer in moe.model.layers:  # any router: the experts are equal and the weights sum to 1
        layer.mlp.gate.weight.normal_()
    torch.testing.assert_close(logits(moe, tokenizer), logits(base, tokenizer), rtol=1e-5, atol=1e-5)
    if tie:
        assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()


def test_forced_routing_equals_dense_model_with_that_experts_mlps(tokenizer) -> None:
    """Oracle routing to expert e = base attention/norms/embeddings + expert e's MLPs."""
    base = make_base(len(tokenizer))
    experts = [make_expert(base, s) for s in (1, 2, 3)]
    moe = build_moe(base.config, base.state_dict(), [e.state_dict() for e in experts], experts_per_token=2)
    hybrid = MistralForCausalLM(base.config).eval()
    mix = {n: (experts[2].state_dict()[n] if is_mlp(n) else t) for n, t in base.state_dict().items()}
    hybrid.load_state_dict(mix)
    with forced_routing(moe, 2):
        torch.testing.assert_close(logits(moe, tokenizer), logits(hybrid, tokenizer), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(moe, tokenizer), logits(hybrid, tokenizer))  # hooks removed on exit


def test_in_place_writes_keep_parameter_storage(tokenizer) -> None:
    base = make_base(len(tokenizer))
    other = make_expert(base, 7)
    moe = build_moe(base.config, base.state_dict(), [base.state_dict()] * 2, experts_per_token=1)
    ptrs = {n: p.data_ptr() for n, p in moe.named_parameters()}
    write_expert_mlps(moe, 1, {n: t for n, t in other.state_dict().items() if is_mlp(n)})
    write_shared(moe, {"model.layers.0.self_attn.q_proj.weight": other.model.layers[0].self_attn.q_proj.weight})
    assert ptrs == {n: p.data_ptr() for n, p in moe.named_parameters()}
    assert torch.equal(expert_views(moe, 1)["model.layers.1.mlp.up_proj.weight"],
                       other.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(expert_views(moe, 0)["model.layers.1.mlp.up_proj.weight"],
                       base.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(moe.model.layers[0].self_attn.q_proj.weight, other.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(KeyError, match="write_expert_mlps"):
        write_shared(moe, {"model.layers.0.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not fit"):
        write_expert_mlps(moe, 0, {"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)})


def test_save_reload_generate_equal(zoo, tokenizer, tmp_path) -> None:
    built = build_from_config(load_moe_config(recipe(zoo, calibrate={"steps": 5})))
    out = save_moe(built, tmp_path / "moe")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    live = dict(built.model.state_dict())
    for name, t in reloaded.state_dict().items():
        assert torch.equal(t, live[name]), name
    assert torch.equal(logits(reloaded, tokenizer), logits(built.model, tokenizer))
    batch = tokenizer(["12+35="], return_tensors="pt")
    a = reloaded.generate(**batch, max_new_tokens=4, do_sample=False)
    b = built.model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b) and a.shape[1] == batch["input_ids"].shape[1] + 4
    assert (out / "moe.yaml").is_file() and json.loads((out / "router_stats.json").read_text())["tokens"] > 0


def test_cli_builds_and_reports_bad_input(zoo, tmp_path, capsys) -> None:
    import yaml

    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(recipe(zoo, gate_mode="cheap_embed")))
    assert moe_main([str(path), str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    twins = recipe(zoo, experts=("add", "add_copy"))
    twins["experts"][1]["positive_prompts"] = ["rev:abc>cba"]  # distinct prompts: only the weights clash
    path.write_text(yaml.safe_dump(twins))
    assert moe_main([str(path), str(tmp_path / "out2")]) == 2
    assert "identical MLP weights" in capsys.readouterr().err


def test_expert_with_other_shapes_is_refused(zoo, tokenizer, tmp_path) -> None:
    from optimizer import UserError

    big = make_base(len(tokenizer) + 8)
    big.save_pretrained(tmp_path / "big")
    data = recipe(zoo)
    data["experts"][1]["source_model"] = str(tmp_path / "big")
    with pytest.raises(UserError, match=r"non-MLP tensor '.*' has shape \[107, 32\]"):
        build_from_config(load_moe_config(data))

"""`python -m optimizer.merge RECIPE.yaml OUT_DIR`: loadable output, both recipe forms, gradients, seeds, and
bad input as one paragraph with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from optimizer.merge.__main__ import main

from ..conftest import save_model, tiny_config

ROOT = Path(__file__).resolve().parents[2]
UP = "model.layers.{}.mlp.up_proj.weight"


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "optimizer.merge", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def write(tmp_path: Path, doc: dict, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def ties(tm, **params) -> dict:
    return {"merge_method": "ties", "base_model": str(tm["base"]), "dtype": "float32",
            "models": [{"model": str(tm["a"]), "parameters": {"weight": 0.7, "density": 0.5}},
                       {"model": str(tm["b_sharded"]), "parameters": {"weight": 0.5, "density": 0.6, **params}}]}


@pytest.fixture(scope="module")
def odd_models(tiny_models, tmp_path_factory):
    """The base with 4 extra vocabulary rows, and a wider model (hidden 48) for the mismatch cases."""
    from transformers import MistralForCausalLM

    root = tmp_path_factory.mktemp("odd")
    base = MistralForCausalLM.from_pretrained(tiny_models["base"])
    big = MistralForCausalLM(tiny_config(vocab_size=base.config.vocab_size + 4))
    sd = base.state_dict()
    with torch.no_grad():
        for name, p in big.named_parameters():
            rows = sd[name].shape[0]
            p.copy_(torch.cat([sd[name], torch.randn(p.shape[0] - rows, *p.shape[1:])]) if p.shape != sd[name].shape
                    else sd[name] + 0.05 * torch.randn(p.shape))
    torch.manual_seed(1)
    return {"big_vocab": save_model(big, root / "big_vocab"),
            "wide": save_model(MistralForCausalLM(tiny_config(hidden_size=48)), root / "wide")}


def test_output_loads_and_generates(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = cli(write(tmp_path, ties(tiny_models)), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("12+35=", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 4)
    assert (tmp_path / "out" / "recipe.yaml").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_slices_form_with_gradient_filters(tiny_models, tmp_path):
    """The classic mergekit SLERP recipe (one slice, full layer range) equals its `models:` form."""
    t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]},
         {"value": 0.5}]
    sources = [{"model": str(tiny_models[k]), "layer_range": [0, 3]} for k in ("base", "a")]
    slices = {"slices": [{"sources": sources}], "merge_method": "slerp", "base_model": str(tiny_models["base"]),
              "parameters": {"t": t}, "dtype": "float32"}
    models = {"models": [{"model": str(tiny_models["a"])}], "merge_method": "slerp",
              "base_model": str(tiny_models["base"]), "parameters": {"t": t}, "dtype": "float32"}
    assert main([write(tmp_path, slices, "s.yaml"), str(tmp_path / "s")]) == 0
    assert main([write(tmp_path, models, "m.yaml"), str(tmp_path / "m")]) == 0
    s, m = weights(tmp_path / "s"), weights(tmp_path / "m")
    assert all(torch.equal(s[k], m[k]) for k in s)
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    assert torch.equal(s[UP.format(2)], base[UP.format(2)])  # mlp gradient reaches 0 (the base) at the last layer


def test_gradient_values_per_layer(tiny_models, tmp_path):
    """weight [0, 1] over 3 layers: 0, 0.5, 1 per layer; embeddings, final norm and lm_head take t=0 (0)."""
    doc = {"merge_method": "task_arithmetic", "base_model": str(tiny_models["base"]), "dtype": "float32",
           "models": [{"model": str(tiny_models["a"]), "parameters": {"weight": [0.0, 1.0]}}]}
    assert main([write(tmp_path, doc), str(tmp_path / "out")]) == 0
    out = weights(tmp_path / "out")
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    a = load_file(str(tiny_models["a"] / "model.safetensors"))
    for layer, w in enumerate([0.0, 0.5, 1.0]):
        n = UP.format(layer)
        torch.testing.assert_close(out[n], base[n] + w * (a[n] - base[n]), rtol=0, atol=1e-6)
    for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(out[n], base[n]), n


def test_seeded_random_masks_are_reproducible(tiny_models, tmp_path):
    doc = {"merge_method": "dare_linear", "base_model": str(tiny_models["base"]), "dtype": "float32",
           "models": [{"model": str(tiny_models["a"]), "parameters": {"weight": 1.0, "density": 0.3}}]}
    recipe = write(tmp_path, doc)
    runs = {}
    for name, args in [("s1", ["--seed", "1"]), ("again", ["--seed", "1"]), ("s2", ["--seed", "2"])]:
        assert main([recipe, str(tmp_path / name), *args]) == 0
        runs[name] = weights(tmp_path / name)
    n = UP.format(1)
    assert torch.equal(runs["s1"][n], runs["again"][n]) and not torch.equal(runs["s1"][n], runs["s2"][n])
    doc["merge_optimizer"] = {"seed": 1}  # the recipe can carry the seed itself
    assert main([write(tmp_path, doc, "seeded.yaml"), str(tmp_path / "seeded")]) == 0
    assert torch.equal(weights(tmp_path / "seeded")[n], runs["s1"][n])


def test_sharded_output(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    assert main([write(tmp_path, ties(tiny_models)), str(tmp_path / "one")]) == 0
    assert main([write(tmp_path, ties(tiny_models)), str(tmp_path / "many"), "--max-shard-size", "20KB"]) == 0
    assert (tmp_path / "many" / "model.safetensors.index.json").exists()
    one, many = weights(tmp_path / "one"), weights(tmp_path / "many")
    assert all(torch.equal(one[k], many[k]) for k in one)
    AutoModelForCausalLM.from_pretrained(tmp_path / "many")


def test_vocab_policy(tiny_models, odd_models, tmp_path):
    doc = ties(tiny_models)
    doc["models"][1]["model"] = str(odd_models["big_vocab"])
    recipe = write(tmp_path, doc)
    r = cli(recipe, str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tensor 'lm_head.weight' has 103 vocabulary rows but the base has 99" in r.stderr
    assert "--vocab-policy" in r.stderr
    assert main([recipe, str(tmp_path / "out"), "--vocab-policy", "truncate_to_base"]) == 0
    out = weights(tmp_path / "out")
    assert out["model.embed_tokens.weight"].shape[0] == 99 == out["lm_head.weight"].shape[0]


def bad_cases(tm, odd):
    base = str(tm["base"])
    return [
        ({**ties(tm), "merge_method": "frankenstein"}, "unknown merge method 'frankenstein'"),
        ({**ties(tm), "base_model": "/no/such/model"}, "no such folder"),
        (ties(tm, density=1.5), "density=1.5"),
        (ties(tm, densty=0.5), "'densty' is not a parameter of 'ties'"),
        ({**ties(tm), "models": [{"model": str(odd["wide"]), "parameters": {"weight": 1.0}}]}, "has shape"),
        ({"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5},
          "models": [{"model": str(tm["a"])}, {"model": str(tm["b"])}]}, "at most 1"),
        ({"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5},
          "slices": [{"sources": [{"model": str(tm[k]), "layer_range": [1, 4]} for k in ("base", "a")]}]},
         "has no layer 3 (it has 3 layers)"),
        ({"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5},
          "slices": [{"sources": [{"model": str(tm[k]), "layer_range": [0, 2]} for k in ("a", "b")]}]},
         "does not list base_model"),
        ({"merge_method": "passthrough", "slices": [{"sources": [{"model": str(tm[k]), "layer_range": [0, 2]}
                                                                 for k in ("a", "b")]}]}, "at most 1"),
        ({"merge_method": "ties", "base_model": base, "models": [{"model": str(tm["a"])}],
          "merge_optimizer": {"precision": "half"}}, "precision='half' is unknown"),
        ({"merge_method": "task_arithmetic", "base_model": base, "models": [{"model": str(tm["a"])}]},
         "sets no 'weight'"),
        ({**ties(tm), "base_model": "nobody/nothing"}, "HF_HUB_OFFLINE"),
        ({**ties(tm), "tokenizer_source": "union"}, "union"),
    ]


def test_bad_input_is_one_paragraph_and_exit_2(tiny_models, odd_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id that is not cached fails at once, no network try
    for i, (doc, needle) in enumerate(bad_cases(tiny_models, odd_models)):
        with pytest.raises(SystemExit) as e:
            main([write(tmp_path, doc, f"bad{i}.yaml"), str(tmp_path / f"out{i}")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err, (needle, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert not (tmp_path / f"out{i}").exists() and not list(tmp_path.glob(f".out{i}*"))


def test_bad_input_from_the_real_command(tiny_models, tmp_path):
    (tmp_path / "bad.yaml").write_text("merge_method: [unclosed\n")
    r = cli(str(tmp_path / "bad.yaml"), str(tmp_path / "out"))
    assert r.returncode == 2 and "not valid YAML" in r.stderr and "Traceback" not in r.stderr
    r = cli(str(tmp_path / "missing.yaml"), str(tmp_path / "out"))
    assert r.returncode == 2 and "cannot read recipe" in r.stderr and "Traceback" not in r.stderr


def test_out_dir_is_protected(tiny_models, tmp_path, capsys):
    recipe = write(tmp_path, ties(tiny_models))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        main([recipe, str(tmp_path / "out")])
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").exists()
    with pytest.raises(SystemExit):
        main([recipe, str(tiny_models["a"]), "--overwrite"])
    assert "is the folder of input model" in capsys.readouterr().err
    assert main([recipe, str(tmp_path / "out"), "--overwrite"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_vocab_rows_semantics(tiny_models, odd_models, tmp_path):
    """truncate_to_base: a bigger model contributes its shared rows; a bigger chat-vector target keeps its
    extra rows untouched (zero task vector there)."""
    from omegaconf import OmegaConf

    from optimizer import UserError
    from optimizer.config import ModelsConfig
    from optimizer.models import ModelSet

    E = "model.embed_tokens.weight"
    base, a = (load_file(str(tiny_models[k] / "model.safetensors")) for k in ("base", "a"))
    big = load_file(str(odd_models["big_vocab"] / "model.safetensors"))
    ta = {"merge_method": "task_arithmetic", "base_model": str(tiny_models["base"]), "dtype": "float32",
          "models": [{"model": str(odd_models["big_vocab"]), "parameters": {"weight": 0.5}}],
          "merge_optimizer": {"vocab_policy": "truncate_to_base"}}
    assert main([write(tmp_path, ta, "big.yaml"), str(tmp_path / "big")]) == 0
    torch.testing.assert_close(weights(tmp_path / "big")[E], base[E] + 0.5 * (big[E][:99] - base[E]), rtol=0, atol=1e-6)

    chat = {**ta, "models": [{"model": str(tiny_models["a"]), "parameters": {"weight": 0.5}}],
            "merge_optimizer": {"vocab_policy": "truncate_to_base", "target": str(odd_models["big_vocab"])}}
    assert main([write(tmp_path, chat, "chat.yaml"), str(tmp_path / "chat")]) == 0
    out = weights(tmp_path / "chat")[E]
    assert out.shape[0] == 103 and torch.equal(out[99:], big[E][99:])
    torch.testing.assert_close(out[:99], big[E][:99] + 0.5 * (a[E] - base[E]), rtol=0, atol=1e-6)

    cfg = {"base": str(tiny_models["base"]), "models": {"big": str(odd_models["big_vocab"])}}
    with pytest.raises(UserError, match="vocabulary rows"):
        ModelSet(OmegaConf.merge(OmegaConf.structured(ModelsConfig), cfg))
    ms = ModelSet(OmegaConf.merge(OmegaConf.structured(ModelsConfig), cfg | {"vocab_policy": "truncate_to_base"}))
    res = ms.load_resident(torch.device("cpu"))
    assert res.deltas[E][0].shape == base[E].shape


def test_frankenmerge_loads_with_its_layer_count(tiny_models, tmp_path):
    """Passthrough slices (3 layers of a, then layers 1-2 of b): a 5-layer model whose layers are the sources'
    layers, embeddings from the first slice's model, final norm and lm_head from the last slice's."""
    from transformers import AutoModelForCausalLM

    doc = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": str(tiny_models["a"]), "layer_range": [0, 3]}]},
                      {"sources": [{"model": str(tiny_models["b"]), "layer_range": [1, 3],
                                    "parameters": {"scale": 0.5}}]}]}
    assert main([write(tmp_path, doc), str(tmp_path / "out")]) == 0
    out = weights(tmp_path / "out")
    a, b = (load_file(str(tiny_models[k] / "model.safetensors")) for k in ("a", "b"))
    assert torch.equal(out[UP.format(2)], a[UP.format(2)])
    torch.testing.assert_close(out[UP.format(3)], 0.5 * b[UP.format(1)], rtol=0, atol=0)
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    torch.testing.assert_close(out["lm_head.weight"], 0.5 * b["lm_head.weight"], rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5
    assert set(dict(model.named_parameters())) == set(out)
    ids = torch.tensor([[1, 5, 6]])
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_output_config_takes_per_layer_lists_from_the_sources(tmp_path):
    from optimizer.checkpoint import TensorInfo
    from optimizer.merge.recipe.layout import Job, Tap, output_config

    for m, types in {"x": ["full", "sliding", "full"], "y": ["sliding", "sliding", "full"]}.items():
        (tmp_path / m).mkdir()
        (tmp_path / m / "config.json").write_text(json.dumps({"layer_types": types, "num_hidden_layers": 3}))
    info = TensorInfo("w", (1,), torch.float32)
    jobs = [Job(f"model.layers.{i}.w", 0, 0.0, Tap(m, f"model.layers.{j}.w"), (), info)
            for i, (m, j) in enumerate([("x", 0), ("x", 1), ("y", 2), ("y", 0)])]
    cfg = output_config({"layer_types": ["full"] * 3, "num_hidden_layers": 3}, jobs,
                        {m: tmp_path / m for m in ("x", "y")})
    assert cfg == {"num_hidden_layers": 4, "layer_types": ["full", "sliding", "full", "sliding"]}

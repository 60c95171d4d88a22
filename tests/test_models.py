"""ModelSet validation from headers, sharded checkpoints, pickle refusal, resident task vectors."""

import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import MistralForCausalLM

from optimizer import UserError
from optimizer.config import ModelsConfig
from optimizer.models import ModelSet

from .conftest import save_model, tiny_config


def mcfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(ModelsConfig), kw)


def test_sharded_checkpoint_reads_like_single(tiny_models):
    ms = ModelSet(mcfg(base=str(tiny_models["base"]), models={"b": str(tiny_models["b_sharded"])}))
    assert len({f.name for f in ms.experts["b"].files.values()}) > 1  # really sharded
    single = load_file(str(tiny_models["b"] / "model.safetensors"))
    for name in ms.tensor_names:
        assert torch.equal(ms.experts["b"].tensor(name), single[name])


def test_resident_deltas_are_differences(tiny_models):
    ms = ModelSet(mcfg(base=str(tiny_models["base"]), models={"a": str(tiny_models["a"])}))
    res = ms.load_resident(torch.device("cpu"))
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    a = load_file(str(tiny_models["a"] / "model.safetensors"))
    n = "model.layers.1.self_attn.o_proj.weight"
    assert torch.allclose(res.deltas[n][0], a[n] - base[n]) and torch.equal(res.anchor[n], base[n])


def test_unknown_path_is_a_user_error(tiny_models):
    with pytest.raises(UserError, match=r"models.models.x='/no/such/model': no such folder"):
        ModelSet(mcfg(base=str(tiny_models["base"]), models={"x": "/no/such/model"}))


def test_shape_mismatch_names_the_tensor(tiny_models, tmp_path):
    other = MistralForCausalLM(tiny_config(intermediate_size=48))
    path = save_model(other, tmp_path / "wide")
    with pytest.raises(UserError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \[32, 48\]"):
        ModelSet(mcfg(base=str(tiny_models["base"]), models={"w": str(path)}))


def test_missing_tensor_names_the_tensor(tiny_models, tmp_path):
    path = tmp_path / "cut"
    shutil.copytree(tiny_models["a"], path)
    sd = load_file(str(path / "model.safetensors"))
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="no tensor 'model.layers.2.mlp.up_proj.weight'"):
        ModelSet(mcfg(base=str(tiny_models["base"]), models={"c": str(path)}))


def test_nan_names_model_and_tensor(tiny_models, tmp_path):
    path = tmp_path / "nan"
    shutil.copytree(tiny_models["a"], path)
    sd = load_file(str(path / "model.safetensors"))
    sd["model.norm.weight"][3] = float("nan")
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    ms = ModelSet(mcfg(base=str(tiny_models["base"]), models={"n": str(path)}))
    with pytest.raises(UserError, match=r"models.models.n: tensor 'model.norm.weight' contains NaN"):
        ms.load_resident(torch.device("cpu"))


def test_pickle_refused_unless_allowed(tiny_models, tmp_path):
    path = tmp_path / "pickled"
    shutil.copytree(tiny_models["a"], path)
    sd = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(sd, path / "pytorch_model.bin")
    with pytest.raises(UserError, match="allow_pickle"):
        ModelSet(mcfg(base=str(tiny_models["base"]), models={"p": str(path)}))
    ms = ModelSet(mcfg(base=str(tiny_models["base"]), models={"p": str(path)}, allow_pickle=True))
    assert torch.equal(ms.experts["p"].tensor("model.norm.weight"), sd["model.norm.weight"])


def test_empty_models_is_a_user_error(tiny_models):
    with pytest.raises(UserError, match="models.models is empty"):
        ModelSet(mcfg(base=str(tiny_models["base"]), models={}))

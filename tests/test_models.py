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


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_task_vectors_equal_the_whole_tensor_expression(tmp_path, file_dtype, dtype, monkeypatch):
    """Deltas are computed a block of rows at a time; the bits are those of (t.float() - b.float()).to(dtype),
    vocabulary rows only one side has included (cut or zero-padded)."""
    import optimizer.models as models
    from optimizer.checkpoint import Checkpoint

    monkeypatch.setattr(models, "_BLOCK", 1000)  # many blocks, uneven last one
    g = torch.Generator().manual_seed(0)
    ckpts = {}
    for name, rows in (("base", 50), ("same", 50), ("more", 53), ("fewer", 47)):
        (tmp_path / name).mkdir()
        save_file({"model.embed_tokens.weight": torch.randn(rows, 33, generator=g).to(file_dtype),
                   "model.norm.weight": torch.randn(33, generator=g).to(file_dtype)},
                  str(tmp_path / name / "model.safetensors"))
        ckpts[name] = Checkpoint(str(tmp_path / name))
    base = ckpts["base"]
    for tname in ("model.embed_tokens.weight", "model.norm.weight"):
        experts = [ckpts["same"]] if tname == "model.norm.weight" else [ckpts[n] for n in ("same", "more", "fewer")]
        anchor, deltas = models.load_tensor_set(tname, base, base, experts, torch.device("cpu"), dtype)
        b = base.tensor(tname).float()
        assert torch.equal(anchor, b.to(dtype))
        for ckpt, d in zip(experts, deltas, strict=True):
            t = ckpt.tensor(tname).float()
            want = torch.zeros_like(b)
            n = min(len(t), len(b))
            want[:n] = t[:n] - b[:n]
            assert d.dtype == dtype and torch.equal(d, want.to(dtype))


def _file_mapped(t: torch.Tensor) -> str | None:
    """The file whose mapping holds `t`'s memory, if any (Linux /proc)."""
    ptr = t.untyped_storage().data_ptr()
    for line in open("/proc/self/maps").read().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi and len(parts) > 5 and parts[5].startswith("/"):
            return parts[5]
    return None


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_live_model_owns_its_memory(tiny_models):
    """transformers leaves same-dtype parameters in a copy-on-write mapping of the safetensors file; the first
    trial's writes would fault in every page. The live model's parameters are copied out while loading."""
    from transformers import AutoModelForCausalLM

    raw = AutoModelForCausalLM.from_pretrained(str(tiny_models["base"]), dtype=torch.float32)
    mapped = [n for n, p in raw.named_parameters() if _file_mapped(p)]
    ms = ModelSet(mcfg(base=str(tiny_models["base"]), models={"a": str(tiny_models["a"])}, dtype="float32"))
    live = ms.load_live(torch.device("cpu"))
    assert not [n for n, p in live.named_parameters() if _file_mapped(p)]
    for (n, p), (_, q) in zip(live.named_parameters(), raw.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    if not mapped:
        pytest.skip("this transformers version copies parameters itself; nothing to check against")


def test_warm_up_applies_the_plan_once(tiny_models):
    from optimizer.merge.apply import Applier, single_plan
    from optimizer.models import warm_up

    ms = ModelSet(mcfg(base=str(tiny_models["base"]), models={"a": str(tiny_models["a"])}))
    res = ms.load_resident(torch.device("cpu"))
    live = ms.load_live(torch.device("cpu"))
    calls = []

    class Spy(Applier):
        def apply(self, plan, *, seed=0, trial=0):
            calls.append((plan.method, seed, trial))
            super().apply(plan, seed=seed, trial=trial)

    seconds = warm_up(Spy(live, res), single_plan(("a",), [1.0]), seed=7)
    assert calls == [("task_arithmetic", 7, 0)] and seconds >= 0
    n = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(dict(live.named_parameters())[n], res.anchor[n] + res.deltas[n][0])

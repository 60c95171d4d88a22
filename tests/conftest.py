"""Shared fixtures: tiny random Mistral models on disk and a toy evaluator (no lm-eval, no zoo)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from optimizer.eval import EVALUATORS, register_evaluator
from optimizer.eval.base import HELDOUT, SEARCH, Scores

# Tiny models: thread hand-offs cost more than the math; one thread is 5-7x faster on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """tmp_path on a tmpfs (/dev/shm) unless --basetemp is given or MERGE_OPTIMIZER_TEST_DISK_TMP is set.

    Studies commit to SQLite several times per trial; on a disk each commit's fsync costs ~25 ms (measured
    on the 2-core CI machine; tmpfs: 0.04 ms), which made short studies sleep most of their run time.
    """
    if config.option.basetemp or os.environ.get("MERGE_OPTIMIZER_TEST_DISK_TMP"):
        return
    shm = Path("/dev/shm")
    try:
        if not (shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 * 2**30):
            return
        base = Path(tempfile.mkdtemp(prefix="merge-optimizer-pytest-", dir=shm))
    except OSError:
        return
    config.option.basetemp = str(base)
    config.add_cleanup(lambda: shutil.rmtree(base, ignore_errors=True))


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests are skipped, visibly (-rs), when no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible): run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _eager_kernels_after_each_test():
    """A study switches the compiled merge kernels on for its process (fused_kernels); kernel tests expect
    the eager ones, whatever ran before them."""
    yield
    from optimizer.merge import fused

    fused.enable(False)


# Parametrize device-agnostic tests with this: CPU always, CUDA too (a `gpu` test) where present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


VOCAB = ["<pad>", "<s>", "</s>", "<unk>"] + [chr(c) for c in range(32, 127)]


def make_tokenizer(path: Path) -> None:
    """A character-level fast tokenizer with BOS/EOS/pad, saved like any HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(path)


def tiny_config(**kw):
    from transformers import MistralConfig

    args = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    args.update(kw)
    return MistralConfig(**args)


def save_model(model, path: Path, tokenizer_from: Path | None = None, **save_kw) -> Path:
    model.save_pretrained(path, **save_kw)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """base + experts a, b (base plus seeded noise) + a sharded copy of b, as safetensors folders."""
    from transformers import MistralForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    base = MistralForCausalLM(tiny_config()).eval()
    out = {"base": save_model(base, root / "base")}
    for i, name in enumerate(["a", "b"]):
        g = torch.Generator().manual_seed(100 + i)
        expert = MistralForCausalLM(tiny_config()).eval()
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        out[name] = save_model(expert, root / name)
        if name == "b":
            out["b_sharded"] = save_model(expert, root / "b_sharded", max_shard_size="20KB")
    return out


class ToyEvaluator:
    """Scores closeness of the live weights to a hidden optimum base + 0.3*delta_a + 0.6*delta_b.

    Task `l0` looks at layer 0, `l1` at layer 1, so the optimum is reachable per layer. Held-out scores are
    offset by a small constant. `cfg.paths` maps base/a/b to model folders.
    """

    name = "toy"
    NAME = "model.layers.{}.mlp.down_proj.weight"

    def __init__(self, cfg, context):
        self.cfg = cfg
        self.context = context
        self.weights = {"l0": 1.0, "l1": 1.0}
        self.calls = 0
        self._targets = None

    def validate(self):
        from optimizer import UserError

        if self.cfg.get("fail_validate"):
            raise UserError("evaluator.fail_validate is set")

    def splits(self):
        return (SEARCH, HELDOUT)

    @property
    def chunk_size(self):
        return self.cfg.get("chunk_size", 10)

    def close(self):
        pass

    def _target(self, layer):
        from safetensors.torch import load_file

        if self._targets is None:
            sd = {k: load_file(str(Path(v) / "model.safetensors")) for k, v in self.cfg.paths.items()}
            self._targets = {}
            for i in (0, 1):
                n = self.NAME.format(i)
                b = sd["base"][n].double()
                self._targets[i] = b + 0.3 * (sd["a"][n].double() - b) + 0.6 * (sd["b"][n].double() - b)
        return self._targets[layer]

    def evaluate(self, model, tokenizer, split, *, on_item=None):
        self.calls += 1
        params = dict(model.named_parameters())
        off = 0.001 if split == HELDOUT else 0.0
        tasks, items = {}, {}
        for i in (0, 1):
            w = params[self.NAME.format(i)].detach().double().cpu()  # the live model may be on a GPU
            err = (w - self._target(i)).abs().flatten()[:60]
            items[f"l{i}"] = [1.0 - 10 * float(e) - off for e in err]
            tasks[f"l{i}"] = 1.0 - float(((w - self._target(i)) ** 2).mean().sqrt()) * 10 - off
        if on_item is not None:  # per-item reports in chunks, interleaving the tasks like lm-eval's chunks
            chunk = self.chunk_size
            for start in range(0, 60, chunk):
                for t in ("l0", "l1"):
                    for j, v in enumerate(items[t][start:start + chunk]):
                        on_item(t, start + j, v)
        return Scores(tasks=tasks, items=items)


if "toy" not in EVALUATORS:
    register_evaluator("toy")(ToyEvaluator)


class LmToyEvaluator:
    """Any causal LM (dense or MoE): task `fit` = exp(-mean token loss) on fixed text; cheap and smooth."""

    name = "lm_toy"
    TEXT = {SEARCH: ["12+35=47", "rev:abc>cba", "hello world"], HELDOUT: ["40+2=42", "rev:xy>yx"]}

    def __init__(self, cfg, context):
        self.cfg, self.context, self.weights = cfg, context, {"fit": 1.0}

    chunk_size = 0

    def validate(self):
        pass

    def splits(self):
        return (SEARCH, HELDOUT)

    def close(self):
        pass

    @torch.no_grad()
    def evaluate(self, model, tokenizer, split, *, on_item=None):
        losses = []
        for text in self.TEXT[split]:
            ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
            losses.append(float(model(ids, labels=ids).loss))
        return Scores(tasks={"fit": float(torch.exp(-torch.tensor(losses).mean()))})


if "lm_toy" not in EVALUATORS:
    register_evaluator("lm_toy")(LmToyEvaluator)

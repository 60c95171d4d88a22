"""ModelSet: the base, the fine-tunes and the target, validated once; resident task vectors on a device."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from optimizer import UserError
from optimizer.checkpoint import Checkpoint, TensorInfo
from optimizer.dtypes import parse_dtype

VOCAB_POLICIES = ("error", "truncate_to_base")
# token-indexed tensors: their first dimension is the vocabulary (Llama/Mistral/Qwen/Gemma, GPT-2, NeoX)
_VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|embed_out|word_embeddings)\.weight$")


def pick_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else mps, else cpu; otherwise the named device (checked)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but no CUDA device is available; use device=auto or device=cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                        "(CUDA_VISIBLE_DEVICES renumbers them from 0); use cuda:0 ... or device=auto.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"device={name!r} but MPS is not available here; use device=auto or device=cpu.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device={name!r}: merge-optimizer runs on cpu, cuda or mps; use one of those or auto.")
    return dev


@dataclass
class Resident:
    """What stays loaded for the whole study: the anchor (target or base) and each model's task vector.

    Args:
        names: tensor names in checkpoint order (the order every trial writes them).
        anchor: name -> tensor the deltas are added to.
        deltas: name -> [delta of model i for i in model order].
    """

    names: list[str]
    anchor: dict[str, torch.Tensor]
    deltas: dict[str, list[torch.Tensor]]
    models: tuple[str, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.anchor.values())
        return n + sum(d.numel() * d.element_size() for ds in self.deltas.values() for d in ds)


class ModelSet:
    """The models of one run, checked for compatibility from file headers before anything is loaded."""

    def __init__(self, cfg: Any):
        if not cfg.models:
            raise UserError("models.models is empty: name at least one fine-tuned model, e.g. "
                            "models.models={chat: path/to/model}.")
        allow = bool(cfg.allow_pickle)
        self.cfg = cfg
        self.vocab_policy = check_vocab_policy(getattr(cfg, "vocab_policy", "error"), "models.vocab_policy")
        self.base = Checkpoint(cfg.base, what="models.base", allow_pickle=allow)
        self.experts = {n: Checkpoint(r, what=f"models.models.{n}", allow_pickle=allow)
                        for n, r in cfg.models.items()}
        self.target = (Checkpoint(cfg.target, what="models.target", allow_pickle=allow)
                       if cfg.target else self.base)
        check_architecture(self.target, bool(cfg.trust_remote_code), required=True)  # the live model's class
        if self.target is not self.base:
            check_architecture(self.base, bool(cfg.trust_remote_code), required=False)
        self.infos: dict[str, TensorInfo] = self.base.infos()
        for ckpt in [*self.experts.values(), self.target]:
            if ckpt is not self.base:
                check_compatible(self.infos, ckpt.infos(), ckpt.what, ckpt.ref, self.vocab_policy)
        first = next(i for i in self.infos.values() if i.dtype.is_floating_point)
        self.dtype = parse_dtype(cfg.dtype, first.dtype)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.experts)

    @property
    def tensor_names(self) -> list[str]:
        return [n for n, i in self.infos.items() if i.dtype.is_floating_point]

    @property
    def n_params(self) -> int:
        """Parameters of one model (from the headers)."""
        return sum(math.prod(i.shape) for i in self.infos.values())

    def load_resident(self, device: torch.device, progress: Any = None) -> Resident:
        """Load the anchor and every task vector onto `device`, one tensor at a time."""
        anchor, deltas = {}, {}
        names = self.tensor_names
        for name in names:
            anchor[name], deltas[name] = load_tensor_set(name, self.base, self.target, list(self.experts.values()),
                                                         device, self.dtype)
            if progress is not None:
                progress(name)
        return Resident(names, anchor, deltas, self.names, device)

    def load_live(self, device: torch.device) -> torch.nn.Module:
        """The model object every trial writes into (loaded once from the target)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(self.target.path), dtype=self.dtype,
                                                     trust_remote_code=bool(self.cfg.trust_remote_code))
        model.to(device).eval()
        own_memory(model)
        live = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in self.tensor_names if n not in live]
        if missing:
            raise UserError(f"the live model built from {self.target.ref!r} has no parameter named "
                            f"{missing[0]!r} (and {len(missing) - 1} more); the checkpoint's tensor names do "
                            "not match its architecture class.")
        return model

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        ref = self.cfg.tokenizer
        path = Checkpoint(ref, what="models.tokenizer").path if ref else self.target.path
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=bool(self.cfg.trust_remote_code))
        if tok.pad_token is None:  # batched scoring needs one; EOS is the usual stand-in
            tok.pad_token = tok.eos_token
        return tok


def check_architecture(ckpt: Checkpoint, trust_remote_code: bool, required: bool) -> None:
    """A model built as a live model must be a class transformers has (or trusted remote code)."""
    import json

    path = ckpt.path / "config.json"
    if not path.is_file():
        if not required:
            return
        raise UserError(f"{ckpt.what}={ckpt.ref!r} has no config.json; the live model needs its architecture.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt.what}={ckpt.ref!r}: {str(path)!r} is not valid JSON ({e}).") from None
    if trust_remote_code or not isinstance(data, dict):
        return
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if data.get("auto_map"):
        raise UserError(f"{ckpt.what}={ckpt.ref!r} needs its own Python code (config.json has auto_map and "
                        f"model_type {model_type!r}, which transformers does not ship). Loading it runs that "
                        "code: set models.trust_remote_code=true only if you trust its source.")
    raise UserError(f"{ckpt.what}={ckpt.ref!r}: model_type {model_type!r} in config.json is unknown to the "
                    "installed transformers; upgrade transformers or check the folder.")


def own_memory(model: torch.nn.Module) -> None:
    """Give every CPU parameter its own memory. transformers maps safetensors files copy-on-write and, when the
    dtype matches, leaves the parameters in that mapping: the first trial's in-place writes would then fault in
    and copy every page (trial 0 several times slower than the next ones). Copied here, one tensor at a time,
    the cost is paid while loading and the file mapping is released."""
    with torch.no_grad():
        for p in model.parameters():
            if p.device.type == "cpu":
                p.data = p.data.clone()


def warm_up(applier: Any, plan: Any, *, seed: int = 0, label: str = "warm-up", console: Any = None) -> float:
    """Materialise `plan` once while loading, with a progress display; returns its seconds.

    The first materialisation pays one-off costs that later ones do not: memoised order statistics of the
    resident task vectors (TIES/DARE-TIES/breadcrumbs magnitude ranks, computed once per task vector),
    first-touch page faults of scratch buffers, lazy imports. Done here, trial 0 costs what every trial costs.
    The trial's own write follows, so the plan warmed with leaves no trace.

    Args:
        applier: the study's applier (dense or MoE).
        plan: a plan of the study's method (e.g. its first baseline).
        seed: the study seed.
        label: what the progress display says.
        console: a rich Console to draw on (default: rich's).
    """
    import time

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    start = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        bar.add_task(label, total=None)
        applier.apply(plan, seed=seed, trial=0)
    return time.perf_counter() - start


def check_vocab_policy(policy: str, what: str) -> str:
    """Return `policy` if it is one of VOCAB_POLICIES, else raise UserError naming `what`."""
    if policy not in VOCAB_POLICIES:
        raise UserError(f"{what}={policy!r} is unknown; use one of {', '.join(VOCAB_POLICIES)}.")
    return policy


def is_vocab_tensor(name: str) -> bool:
    """True for token-indexed tensors (input embeddings, lm_head), whose first dimension is the vocabulary."""
    return bool(_VOCAB_TENSOR.search(name))


def check_compatible(ref: dict[str, TensorInfo], other: dict[str, TensorInfo], what: str, where: str,
                     vocab_policy: str = "error") -> None:
    """Raise UserError naming the first tensor whose name or shape differs from the base's.

    Args:
        ref: the base's tensors.
        other: another model's tensors.
        what, where: how the model is named in messages (config key, reference).
        vocab_policy: "error", or "truncate_to_base": embeddings / lm_head may differ in their first
            (vocabulary) dimension; the merge keeps the vocabulary of the model it writes into.
    """
    for name, info in ref.items():
        if name not in other:
            raise UserError(f"{what}={where!r} has no tensor {name!r} that the base has; all models must "
                            "share one architecture (same tensor names).")
        shape = other[name].shape
        if shape == info.shape:
            continue
        if is_vocab_tensor(name) and shape[1:] == info.shape[1:]:
            if vocab_policy == "truncate_to_base":
                continue
            raise UserError(f"{what}={where!r}: tensor {name!r} has {shape[0]} vocabulary rows but the base "
                            f"has {info.shape[0]}; the models use different vocabularies. Set vocab_policy=truncate_to_base "
                            "(models.vocab_policy in a study, --vocab-policy for python -m optimizer.merge, "
                            "merge_optimizer.vocab_policy in a recipe) to merge only the rows they share (the result keeps "
                            "the vocabulary and tokenizer of the model it is built on), or resize the "
                            "vocabularies to match first.")
        raise UserError(f"{what}={where!r}: tensor {name!r} has shape {list(shape)} but the "
                        f"base has {list(info.shape)}; models of different sizes cannot be merged.")
    extra = [n for n in other if n not in ref]
    if extra:
        raise UserError(f"{what}={where!r} has tensor {extra[0]!r} that the base lacks; all models must "
                        "share one architecture (same tensor names).")


def load_tensor_set(name: str, base: Checkpoint, target: Checkpoint, experts: Sequence[Checkpoint],
                    device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One tensor's anchor and task vectors, as the study holds them (the one definition, shared by the
    study and `python -m optimizer.merge`, so a recipe re-applied reproduces a trial bit for bit).

    Deltas are taken in float32 and then stored in `dtype`, a block of rows at a time (elementwise, so the
    bits are those of the whole-tensor expression; the float32 temporaries stay a few MiB instead of two
    float32 copies of the tensor, which for a 32k-vocabulary embedding is ~0.4 GB of transient memory per
    tensor). Vocabulary rows that exist in only one of a model and the base (a checked vocab policy let them
    differ) get a zero task vector: the anchor (target, else base) keeps its own rows.

    Args:
        name: tensor name.
        base: the checkpoint task vectors are taken against.
        target: the anchor the deltas are added to (`base` itself when there is no target).
        experts: the fine-tunes, in model order.
        device: where the tensors go.
        dtype: dtype of the returned anchor and deltas.
    """
    b = base.tensor(name).to(device)
    check_finite(b, name, base.what)
    tgt = b
    if target is not base:
        tgt = target.tensor(name).to(device)
        check_finite(tgt, name, target.what)
    deltas = [_delta(ckpt, name, b, tgt.shape[0], device, dtype) for ckpt in experts]
    return _cast(tgt, dtype), deltas


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.float().to(dtype)` (the rounding the anchor always had), without a float32 copy when not needed."""
    if t.dtype == dtype:
        return t
    if t.dtype == torch.float32 or dtype == torch.float32:
        return t.to(dtype)
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    flat, fo = t.reshape(-1), out.view(-1)
    for r0, r1 in _row_blocks(t):
        fo[r0:r1] = flat[r0:r1].float().to(dtype)
    return out


_BLOCK = 1 << 20  # elements per float32 temporary


def _row_blocks(t: torch.Tensor) -> list[tuple[int, int]]:
    """Flat element ranges of whole rows (dim 0), about _BLOCK elements each."""
    n = t.numel()
    row = max(n // max(t.shape[0], 1), 1) if t.dim() else 1
    step = max(_BLOCK // row, 1) * row
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _delta(ckpt: Checkpoint, name: str, b: torch.Tensor, rows: int, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """One model's task vector `(t.float() - b.float()).to(dtype)` (its full tensor is freed on return, before
    the next model's is read). Vocabulary rows only one side has are cut, or zero-padded to the anchor's `rows`."""
    t = ckpt.tensor(name).to(device)
    check_finite(t, name, ckpt.what)
    out = torch.zeros((rows, *b.shape[1:]), dtype=dtype, device=b.device)
    shared = min(t.shape[0], b.shape[0], rows) if b.dim() else 1
    if b.dim() and not (t.shape == b.shape and rows == b.shape[0]):
        t, bb, o = t[:shared], b[:shared], out[:shared]
    else:
        bb, o = b, out
    ft, fb, fo = t.reshape(-1), bb.reshape(-1), o.view(-1)
    for r0, r1 in _row_blocks(bb):
        fo[r0:r1] = (ft[r0:r1].float() - fb[r0:r1].float()).to(dtype)
    return out


def check_finite(t: torch.Tensor, name: str, what: str) -> None:
    # in chunks: isfinite on a whole tensor makes about one tensor's worth of temporaries
    if not all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(1 << 20)):
        raise UserError(f"{what}: tensor {name!r} contains NaN or inf; the checkpoint is corrupt.")

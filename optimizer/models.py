"""ModelSet: the base, the fine-tunes and the target, validated once; resident task vectors on a device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from optimizer import UserError
from optimizer.checkpoint import Checkpoint, TensorInfo

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else mps, else cpu; otherwise the named device (checked)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but no CUDA device is available; use device=auto or device=cpu.")
    return dev


def parse_dtype(name: str, fallback: torch.dtype) -> torch.dtype:
    if name in (None, "auto"):
        return fallback
    if name not in _DTYPES:
        raise UserError(f"dtype={name!r} is not supported; use one of auto, {', '.join(sorted(_DTYPES))}.")
    return _DTYPES[name]


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
        self.base = Checkpoint(cfg.base, what="models.base", allow_pickle=allow)
        self.experts = {n: Checkpoint(r, what=f"models.models.{n}", allow_pickle=allow)
                        for n, r in cfg.models.items()}
        self.target = (Checkpoint(cfg.target, what="models.target", allow_pickle=allow)
                       if cfg.target else self.base)
        self.infos: dict[str, TensorInfo] = self.base.infos()
        for ckpt in [*self.experts.values(), self.target]:
            if ckpt is not self.base:
                check_compatible(self.infos, ckpt.infos(), ckpt.what, ckpt.ref)
        first = next(i for i in self.infos.values() if i.dtype.is_floating_point)
        self.dtype = parse_dtype(cfg.dtype, first.dtype)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.experts)

    @property
    def tensor_names(self) -> list[str]:
        return [n for n, i in self.infos.items() if i.dtype.is_floating_point]

    def load_resident(self, device: torch.device, progress: Any = None) -> Resident:
        """Load the anchor and every task vector onto `device`, one tensor at a time."""
        anchor, deltas = {}, {}
        names = self.tensor_names
        for name in names:
            base = self.base.tensor(name).to(device, torch.float32)
            check_finite(base, name, self.base.what)
            tgt = base if self.target is self.base else self.target.tensor(name).to(device, torch.float32)
            check_finite(tgt, name, self.target.what)
            ds = []
            for ckpt in self.experts.values():
                t = ckpt.tensor(name).to(device, torch.float32)
                check_finite(t, name, ckpt.what)
                ds.append((t - base).to(self.dtype))
            anchor[name] = tgt.to(self.dtype)
            deltas[name] = ds
            if progress is not None:
                progress(name)
        return Resident(names, anchor, deltas, self.names, device)

    def load_live(self, device: torch.device) -> torch.nn.Module:
        """The model object every trial writes into (loaded once from the target)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(self.target.path), dtype=self.dtype,
                                                     trust_remote_code=bool(self.cfg.trust_remote_code))
        model.to(device).eval()
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


def check_compatible(ref: dict[str, TensorInfo], other: dict[str, TensorInfo], what: str, where: str) -> None:
    """Raise UserError naming the first tensor whose name or shape differs from the base's."""
    for name, info in ref.items():
        if name not in other:
            raise UserError(f"{what}={where!r} has no tensor {name!r} that the base has; all models must "
                            "share one architecture (same tensor names).")
        if other[name].shape != info.shape:
            raise UserError(f"{what}={where!r}: tensor {name!r} has shape {list(other[name].shape)} but the "
                            f"base has {list(info.shape)}; models of different sizes cannot be merged.")
    extra = [n for n in other if n not in ref]
    if extra:
        raise UserError(f"{what}={where!r} has tensor {extra[0]!r} that the base lacks; all models must "
                        "share one architecture (same tensor names).")


def check_finite(t: torch.Tensor, name: str, what: str) -> None:
    if not torch.isfinite(t).all():
        raise UserError(f"{what}: tensor {name!r} contains NaN or inf; the checkpoint is corrupt.")

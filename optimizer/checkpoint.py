"""One model checkpoint on disk: locate it, list its tensors from headers, read tensors one at a time."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from optimizer import UserError
from optimizer.dtypes import SAFETENSORS

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def locate(ref: str, *, what: str = "model") -> Path:
    """Turn a model reference (local folder, `zoo://name`, or hub id) into a local folder.

    Hub ids are looked up in the local Hugging Face cache first and downloaded only when online.
    """
    if ref.startswith("zoo://"):
        from optimizer.zoo import resolve_model_ref

        return Path(resolve_model_ref(ref))
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{what}={ref!r} is a file; point it at the model's folder (config.json + weights).")
    if not _HUB_ID.match(ref):
        raise UserError(f"{what}={ref!r}: no such folder. Give a local model folder, a hub id (org/name), "
                        "or a demo zoo model such as zoo://base.")
    return _from_hub(ref, what)


def _from_hub(ref: str, what: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(ref, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached: fall through to a download attempt
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"{what}={ref!r} is not a local folder and not in the Hugging Face cache, and "
                        "HF_HUB_OFFLINE=1. Download it first or pass a local path.")
    try:
        return Path(snapshot_download(ref, allow_patterns=patterns))
    except Exception as e:
        raise UserError(f"{what}={ref!r} is not a local folder and could not be fetched from the hub "
                        f"({type(e).__name__}: {e}). Check the id, your network, or pass a local path.") from None


class Checkpoint:
    """Lazy view of one HF model folder: tensor names, shapes and dtypes from headers; tensors on demand."""

    def __init__(self, ref: str, *, what: str = "model", allow_pickle: bool = False):
        self.ref = ref
        self.what = what
        self.path = locate(ref, what=what)
        self.files = self._index(allow_pickle)
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}

    def _open(self, f: Path, device: str = "cpu"):
        """safe_open, with a truncated, corrupt or unreadable file as a UserError naming it."""
        try:
            return safe_open(f, framework="pt", device=device)
        except Exception as e:  # SafetensorError (bad header, file shorter than its header says), OSError
            raise UserError(f"{self.what}={self.ref!r}: weight file {str(f)!r} cannot be read ({e}); it is "
                            "truncated or corrupt (an interrupted download or copy?). Fetch or copy it "
                            "again.") from None

    def _index(self, allow_pickle: bool) -> dict[str, Path]:
        p = self.path
        index = p / "model.safetensors.index.json"
        if index.exists():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
                files = {name: p / fname for name, fname in wmap.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{self.what}={self.ref!r}: {str(index)!r} is not a valid safetensors index "
                                f"({type(e).__name__}: {e}); fetch or copy the model again.") from None
            missing = sorted({f for f in files.values() if not f.is_file()})
            if missing:
                raise UserError(f"{self.what}={self.ref!r}: shard {str(missing[0])!r} named in {index.name} "
                                "is missing; fetch or copy the model again.")
            return files
        if (p / "model.safetensors").exists():
            with self._open(p / "model.safetensors") as f:
                return {name: p / "model.safetensors" for name in f.keys()}
        bins = sorted(p.glob("pytorch_model*.bin"))
        if bins and not allow_pickle:
            raise UserError(f"{self.what}={self.ref!r} holds only pickled .bin weights, which can run code "
                            "when loaded. Convert it to safetensors, or set models.allow_pickle=true "
                            "(loaded with weights_only=True).")
        if bins:
            out: dict[str, Path] = {}
            for b in bins:
                for name in torch.load(b, map_location="meta", weights_only=True, mmap=True):
                    out[name] = b
            return out
        raise UserError(f"{self.what}={self.ref!r} ({p}) has no model.safetensors, "
                        "model.safetensors.index.json or pytorch_model*.bin.")

    def infos(self) -> dict[str, TensorInfo]:
        """Name -> TensorInfo for every tensor, read from file headers only."""
        out: dict[str, TensorInfo] = {}
        by_file: dict[Path, list[str]] = {}
        for name, f in self.files.items():
            by_file.setdefault(f, []).append(name)
        for f, names in by_file.items():
            if f.suffix == ".bin":
                sd = torch.load(f, map_location="meta", weights_only=True, mmap=True)
                for n in names:
                    out[n] = TensorInfo(n, tuple(sd[n].shape), sd[n].dtype)
                continue
            with self._open(f) as h:
                for n in names:
                    sl = h.get_slice(n)
                    out[n] = TensorInfo(n, tuple(sl.get_shape()), SAFETENSORS.get(sl.get_dtype(), torch.float32))
        return out

    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Read one tensor (memory-mapped for safetensors)."""
        f = self.files[name]
        if f.suffix == ".bin":
            if f not in self._pickled:
                self._pickled[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            return self._pickled[f][name].to(device)
        with self._open(f, str(device)) as h:
            return h.get_tensor(name)

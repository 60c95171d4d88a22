"""Stream tensors into safetensors shards one at a time, so writing a merged model never holds it whole.

Every tensor's name, shape and dtype are known before the first one is computed (from the input headers),
so each shard's header is written first and the tensors' bytes follow as they are produced. The files are
ordinary safetensors (8-byte header length, JSON header padded to 8 bytes, contiguous little-endian data)
plus `model.safetensors.index.json` when there is more than one shard, as transformers writes them.

Example:
    >>> import torch, tempfile
    >>> d = tempfile.mkdtemp()
    >>> w = ShardWriter(d, [("x", (2,), torch.float32)])
    >>> w.write("x", torch.ones(2)); w.close()
    >>> from safetensors.torch import load_file; load_file(f"{d}/model.safetensors")["x"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from optimizer.dtypes import SAFETENSORS_CODE

Entry = tuple[str, tuple[int, ...], torch.dtype]


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def plan_shards(entries: Sequence[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Split entries, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = nbytes(e[1], e[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


class ShardWriter:
    """Writes the announced tensors, in the announced order, into `out_dir`.

    Args:
        out_dir: destination folder (created).
        entries: (name, shape, dtype) of every tensor, in the order `write` will be called.
        max_shard_bytes: shard size limit (default 5 GB, as transformers' default shard size).
        metadata: string metadata stored in each header (`{"format": "pt"}` is always set).
    """

    def __init__(self, out_dir: str | Path, entries: Sequence[Entry], max_shard_bytes: int = 5 * 10**9,
                 metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shards = plan_shards(entries, max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.order = [e for shard in self.shards for e in shard]
        self.starts = {sum(len(sh) for sh in self.shards[:i]) for i in range(len(self.shards))}
        self.pos = 0
        self.file: BinaryIO | None = None
        self.shard_index = -1

    def _name(self, i: int) -> str:
        n = len(self.shards)
        return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"

    def _open_next(self) -> None:
        if self.file is not None:
            self.file.close()
        self.shard_index += 1
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name, shape, dtype in self.shards[self.shard_index]:
            n = nbytes(shape, dtype)
            header[name] = {"dtype": SAFETENSORS_CODE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self.file = open(self.out_dir / self._name(self.shard_index), "wb")  # noqa: SIM115 (closed in close())
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must match the announced name, shape and dtype."""
        want = self.order[self.pos]
        if (name, tuple(tensor.shape), tensor.dtype) != want:
            raise ValueError(f"writer expected {want}, got {(name, tuple(tensor.shape), tensor.dtype)}")
        if self.pos in self.starts:
            self._open_next()
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self.file.write(t.view(torch.uint8).numpy().data)
        self.pos += 1

    def close(self) -> None:
        """Finish the last shard and write the index (several shards); every tensor must have been written."""
        if self.pos != len(self.order):
            raise ValueError(f"writer closed after {self.pos} of {len(self.order)} tensors")
        if self.shard_index < 0:  # no tensors at all: still a valid (empty) file
            self._open_next()
        self.file.close()
        if len(self.shards) > 1:
            weight_map = {e[0]: self._name(i) for i, shard in enumerate(self.shards) for e in shard}
            total = sum(nbytes(e[1], e[2]) for e in self.order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

"""The one table of dtypes: names a config may use, safetensors' codes, and the name a recipe writes."""

from __future__ import annotations

import torch

from optimizer import UserError

# Config / recipe names (mergekit's spellings and the short ones) -> torch dtype.
NAMED: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
CONFIG_NAMES: tuple[str, ...] = ("auto", *NAMED)

# safetensors header codes <-> torch dtypes (every dtype a checkpoint may hold).
SAFETENSORS: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_CODE: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS.items()}


def parse_dtype(name: str | None, fallback: torch.dtype, key: str = "dtype") -> torch.dtype:
    """`auto` (or None) -> `fallback`; a known name -> its dtype; anything else -> UserError naming `key`."""
    if name in (None, "auto"):
        return fallback
    if name not in NAMED:
        raise UserError(f"{key}={name!r} is not supported; use one of {', '.join(CONFIG_NAMES)}.")
    return NAMED[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name configs and recipes write: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")

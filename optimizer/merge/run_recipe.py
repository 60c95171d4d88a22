"""Apply a mergekit-style recipe with our kernels and write a loadable HF model folder.

``python -m optimizer.merge RECIPE.yaml OUT_DIR`` is a thin wrapper around :func:`merge_recipe`. The merge runs
one tensor at a time: the base's tensor, each model's tensor (turned into a task vector exactly as a study
holds it, see ``optimizer.models.load_tensor_set``), the kernel's result, streamed into safetensors shards
(``optimizer.merge.writer``). Memory is a few tensors, never several models.

Recipe semantics are mergekit's (``optimizer.merge.recipe``: schema, slice layout, resolution), plus the
``merge_optimizer`` key that mergekit ignores: seed, trial and device of random masks (seeded per tensor with
``seed_for(seed, trial, name)``, as a study's trial is), a chat-vector ``target``, the ``base`` reference of
methods without one, ``rescale: inverse_density``, ``vocab_policy`` and ``precision``.

The output folder holds config.json (the anchor's, dtype and layer count updated: frankenmerges have the
slices' total), generation_config.json, the tokenizer files (of ``tokenizer_source``, else of the model the
result is built on), the weights and the recipe.

Example:
    >>> merge_recipe("best/recipe.yaml", "merged/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from optimizer import UserError
from optimizer.checkpoint import Checkpoint
from optimizer.dtypes import dtype_name
from optimizer.merge.recipe.inputs import Inputs, load_recipe, resolve, tensor_params
from optimizer.merge.recipe.layout import Job, Tap, output_config
from optimizer.merge.sparsify import seed_for
from optimizer.merge.writer import ShardWriter
from optimizer.models import load_tensor_set, pick_device

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def merge_recipe(recipe_path: str | Path, out_dir: str | Path, *, seed: int | None = None,
                 trial: int | None = None, device: str | None = None, vocab_policy: str | None = None,
                 allow_pickle: bool = False, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
                 precision: str | None = None, kernels: str | None = None, log: Any = None) -> Path:
    """Apply the recipe at `recipe_path` and write the merged model to `out_dir`.

    Args:
        recipe_path: mergekit-style YAML.
        out_dir: destination folder (written via a temporary sibling, then renamed).
        seed, trial: seed and trial number of random masks (default: the recipe's, else 0).
        device: where the kernels run (`auto`, `cpu`, `cuda`, ...). Default: for random-mask methods the
            device type the recipe's masks were drawn on (`merge_optimizer.device`) if present here, else auto.
        vocab_policy: "error" or "truncate_to_base" for models with different vocabulary sizes.
        allow_pickle: accept `.bin` checkpoints.
        max_shard_bytes: output shard size.
        overwrite: replace a non-empty `out_dir`.
        precision: "float32" (default) or "storage" (compute in the storage dtype, as mergekit).
        kernels: "eager" or "fused" (the compiled one-pass kernels); default: the recipe's
            `merge_optimizer.kernels` (a study writes `fused` when it merged with them), else eager.
        log: callable for progress lines (default: stderr).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    recipe, raw = load_recipe(recipe_path)
    inp = resolve(recipe, raw, seed=seed, trial=trial, vocab_policy=vocab_policy, allow_pickle=allow_pickle,
                  precision=precision, kernels=kernels)
    out = _check_out_dir(Path(out_dir), inp, overwrite)
    if not (Path(inp.anchor.path) / "config.json").exists():
        raise UserError(f"{inp.anchor.what}={inp.anchor.ref!r} has no config.json; the merged folder needs the "
                        "architecture of the model it is built on.")
    dev = _device(device, inp, log)
    from optimizer.merge import fused

    was_on = fused.enabled()
    _kernels(inp, dev, log)
    params = {j.name: tensor_params(inp, j) for j in inp.jobs if j.info.dtype.is_floating_point}
    if inp.method.stochastic:
        log(f"random masks: seed {inp.seed}, trial {inp.trial} (per tensor: seed_for(seed, trial, name)) on {dev}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_weights(inp, tmp, params, dev, max_shard_bytes, log)
        _write_side_files(inp, tmp, Path(recipe_path))
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        fused.enable(was_on)
    log(f"{inp.method.name} merge of {len(inp.recipe.models)} models written to {out}")
    return out


def _kernels(inp: Inputs, dev: torch.device, log: Any) -> None:
    """Switch the compiled kernels on when asked (the recipe's study used them: same bits as its trial)."""
    from optimizer.merge import fused

    why_not = fused.available(dev) if inp.kernels == "fused" else None
    if why_not and not inp.kernels_from_recipe:
        raise UserError(f"--kernels fused, but the compiled merge kernels cannot run on {dev}: {why_not}. "
                        "Use --kernels eager (the same merge up to float32 rounding in the last bit).")
    if why_not:
        log(f"warning: the recipe's study merged with the compiled kernels, which cannot run on {dev} "
            f"({why_not}); the eager kernels may differ from its trial in the last bit of a few elements")
    fused.enable(inp.kernels == "fused" and not why_not)
    if fused.enabled():
        log("compiled merge kernels (as the recipe's study): compiling takes seconds to a minute once")


def _device(requested: str | None, inp: Inputs, log: Any) -> torch.device:
    """The device to merge on; random masks depend on the device type (CPU and CUDA generators differ)."""
    wanted = inp.mask_device if inp.method.stochastic else None
    if requested is None:
        requested = "auto"
        if wanted:
            try:
                requested = str(pick_device(wanted))
            except UserError:
                pass
    dev = pick_device(requested)
    if wanted and dev.type != wanted:
        log(f"warning: the recipe's random masks were drawn on {wanted}; drawing them on {dev.type} gives other "
            "masks, so the result will not be the study's trial")
    return dev


def _check_out_dir(out: Path, inp: Inputs, overwrite: bool) -> Path:
    out = out.expanduser().resolve()
    inputs = [(c.ref, Path(c.path)) for c in [*inp.ckpts.values(), *([inp.target] if inp.target else [])]]
    for ref, path in [*inputs, *([("tokenizer_source", inp.tokenizer)] if inp.tokenizer else [])]:
        src = path.resolve()
        if out == src or out in src.parents or src in out.parents:  # --overwrite would delete an input
            how = "is" if out == src else "contains" if out in src.parents else "is inside"
            raise UserError(f"OUT_DIR {str(out)!r} {how} the folder of input model {ref!r} ({str(src)!r}); "
                            "choose an OUT_DIR outside every input.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"OUT_DIR {str(out)!r} exists and is not empty; pass --overwrite to replace it.")
    return out


class _Tapped:
    """A checkpoint read through one tensor name (a slice's source layer), for ``load_tensor_set``."""

    def __init__(self, ckpt: Checkpoint, name: str):
        self.ckpt, self.name = ckpt, name
        self.what, self.ref, self.path = ckpt.what, ckpt.ref, ckpt.path

    def tensor(self, _name: str) -> torch.Tensor:
        return self.ckpt.tensor(self.name)


def _tensors(inp: Inputs, job: Job, dev: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The job's anchor and task vectors, exactly as a study holds them (``load_tensor_set``)."""
    def view(tap: Tap) -> Any:
        ckpt = inp.ckpts[tap.model]
        return ckpt if tap.name == job.name else _Tapped(ckpt, tap.name)

    base = view(job.ref)
    return load_tensor_set(job.name, base, inp.target or base, [view(t) for t in job.inputs], dev, inp.dtype)


def _write_weights(inp: Inputs, dest: Path, params: Mapping[str, Any], dev: torch.device, max_shard_bytes: int,
                   log: Any) -> None:
    """Merge and stream every output tensor in layout order; non-float tensors are copied from the reference."""
    infos = inp.target.infos() if inp.target else {}
    shapes = {j.name: tuple((infos.get(j.name) or j.info).shape) for j in inp.jobs}
    entries = [(j.name, shapes[j.name], inp.out_dtype if j.name in params else j.info.dtype) for j in inp.jobs]
    writer = ShardWriter(dest, entries, max_shard_bytes)
    step = max(1, len(inp.jobs) // 10)
    for i, job in enumerate(inp.jobs):
        if i and i % step == 0:
            log(f"  {i}/{len(inp.jobs)} tensors merged")
        if job.name not in params:
            writer.write(job.name, (inp.target or inp.ckpts[job.ref.model]).tensor(
                job.name if inp.target else job.ref.name))
            continue
        anchor, deltas = _tensors(inp, job, dev)
        gen = None
        if inp.method.stochastic:  # exactly as optimizer.merge.apply.Applier seeds a trial
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed_for(inp.seed, inp.trial, job.name))
        mp, gp = params[job.name]
        try:
            merged = inp.method.fn(anchor, deltas, mp, gp, generator=gen, name=job.name)
        except ValueError as e:
            raise UserError(f"cannot merge tensor {job.name!r}: {e}.") from None
        writer.write(job.name, merged.to(inp.out_dtype))
        del anchor, deltas, merged
    writer.close()


def _write_side_files(inp: Inputs, dest: Path, recipe_path: Path) -> None:
    """config.json (dtype updated), generation config, tokenizer files and the recipe itself."""
    src = Path(inp.anchor.path)
    config = json.loads((src / "config.json").read_text())
    if inp.recipe.form == "slices":
        config = output_config(config, inp.jobs, {m: c.path for m, c in inp.ckpts.items()})
    out_name = dtype_name(inp.out_dtype)
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = out_name
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (src / "generation_config.json").exists():
        shutil.copy2(src / "generation_config.json", dest / "generation_config.json")
    copied = [f for f in _TOKENIZER_FILES if inp.tokenizer and (inp.tokenizer / f).exists()]
    for f in copied:
        shutil.copy2(inp.tokenizer / f, dest / f)
    if inp.tokenizer and not copied:
        print(f"warning: no tokenizer files in {inp.tokenizer}; the output has no tokenizer", file=sys.stderr)
    shutil.copy2(recipe_path, dest / "recipe.yaml")

"""Merging must not hold several copies of a model: peak memory measured as process RSS.

tracemalloc does not see torch's allocations, so each measurement runs in a fresh subprocess and reads the
kernel's peak-RSS counter (VmHWM in /proc/self/status), reset right before the merge (`5` > clear_refs).
glibc's malloc would otherwise keep freed blocks and hand them back without RSS growth (its mmap threshold
grows up to 32 MB after a free), hiding temporaries; MALLOC_MMAP_THRESHOLD_ fixes the threshold so every large
block is mmapped on allocation and unmapped on free, and RSS follows live memory. A negative control (a naive
full-tensor TIES) checks that the measurement does catch full-size temporaries.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMEL = 8 << 20  # 8M float32 = 32 MiB per tensor: far above allocator noise
MODELS = 2


def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _peak_during(fn) -> int:
    """Peak RSS growth while `fn()` runs, in bytes."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def _resident_ties(naive: bool) -> dict:
    """Measure one TIES trial on a resident set of 2 tensors x (anchor + MODELS task vectors)."""
    import torch

    from optimizer.merge.apply import Applier
    from optimizer.models import Resident
    from optimizer.plan import MergePlan, constant

    torch.set_num_threads(1)
    names, models = ["w0", "w1"], tuple(f"m{i}" for i in range(MODELS))
    live = torch.nn.Module()
    for n in names:
        live.register_parameter(n, torch.nn.Parameter(torch.zeros(NUMEL), requires_grad=False))
    gen = torch.Generator().manual_seed(0)  # filled in place: building allocates no temporaries
    anchor = {n: torch.empty(NUMEL).normal_(generator=gen) for n in names}
    deltas = {n: [torch.empty(NUMEL).normal_(0, 0.01, generator=gen) for _ in models] for n in names}
    plan = MergePlan("ties", models, {"weight": {m: constant(0.7) for m in models},
                                      "density": {m: constant(0.5) for m in models}},
                     {"normalize": constant(1.0), "rescale": constant(0.0)})
    applier = Applier(live, Resident(names, anchor, deltas, models))

    def naive_ties() -> None:  # mergekit-style: stacked full-size float32 temporaries
        for n in names:
            stacked = torch.stack(deltas[n]) * 0.7
            agree = stacked.sign() == stacked.sum(0).sign()
            live.get_parameter(n).data.copy_(anchor[n] + (stacked * agree).sum(0) / (0.7 * agree.sum(0)).clamp(min=1))

    growth = _peak_during(naive_ties if naive else lambda: applier.apply(plan, seed=0, trial=1))
    return {"growth": growth, "tensor_bytes": NUMEL * 4}


def _recipe_merge(root: str) -> dict:
    """Measure `merge_recipe` (TIES) on three 8-tensor checkpoints written under `root`."""
    import torch
    from safetensors.torch import save_file

    from optimizer.merge.run_recipe import merge_recipe

    torch.set_num_threads(1)
    numel, count = NUMEL // 2, 8
    gen = torch.Generator().manual_seed(0)
    refs = {}
    for m in ("base", "a", "b"):
        folder = Path(root) / m
        folder.mkdir()
        save_file({f"model.layers.{i}.w.weight": torch.empty(numel).normal_(generator=gen) for i in range(count)},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"num_hidden_layers": count}))
        refs[m] = str(folder)
    recipe = Path(root) / "recipe.yaml"
    recipe.write_text(json.dumps({"merge_method": "ties", "base_model": refs["base"], "models": [
        {"model": refs[m], "parameters": {"weight": 0.7, "density": 0.5}} for m in ("a", "b")]}))
    growth = _peak_during(lambda: merge_recipe(recipe, Path(root) / "out", device="cpu", log=lambda _: None))
    return {"growth": growth, "tensor_bytes": numel * 4, "model_bytes": numel * 4 * count}


def measure(call: str) -> dict:
    """Run `call` (an expression over this module) in a fresh interpreter with a fixed mmap threshold."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak-RSS counter")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": "1"}
    code = f"import json, tests.merge.test_memory as t; print(json.dumps(t.{call}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_ties_trial_peak_is_far_below_the_models():
    """A TIES trial's temporaries stay chunk-sized: < 1.5 x largest tensor x models (a naive one exceeds it)."""
    m = measure("_resident_ties(False)")
    bound = 1.5 * m["tensor_bytes"] * MODELS
    assert m["growth"] < bound, f"peak grew {m['growth'] / 2**20:.1f} MiB, bound {bound / 2**20:.0f} MiB"
    control = measure("_resident_ties(True)")
    assert control["growth"] > bound, "the measurement missed full-size temporaries of a naive TIES"


def test_recipe_merge_holds_a_few_tensors_not_models(tmp_path):
    """python -m optimizer.merge holds one tensor's inputs, task vectors and result (plus reading slack):
    peak growth < (models + 4) tensors, which is less than one model here (measured: models + 3)."""
    m = measure(f"_recipe_merge({str(tmp_path)!r})")
    bound = (2 + 4) * m["tensor_bytes"]
    assert bound < m["model_bytes"]
    assert m["growth"] < bound, f"peak grew {m['growth'] / 2**20:.1f} MiB, bound {bound / 2**20:.0f} MiB"

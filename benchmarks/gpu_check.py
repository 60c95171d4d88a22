"""The GPU check's measurements as one table (run by benchmarks/gpu_check.sh, which sets sizes and installs torch).

Three parts, each under its own time limit, all on --device:
1. merge kernels (benchmarks/merge_kernels.py's tensor set and timing): ms and x copy speed per method, with the
   compiled one-pass kernels (first call: compiling) and the eager ones;
2. the trial-cost benchmark (benchmarks/trial_cost.py) on its model set: materialisation first/steady,
   evaluation, peak RSS, and mergekit when it is installed;
3. a short demo-zoo study (`python -m optimizer device=... n_trials=N`): merge and evaluation seconds per trial.

    python benchmarks/gpu_check.py --device cuda
    python benchmarks/gpu_check.py --device cpu --kernel-layers 1 --kernel-hidden 256 --trials 3   (CI size)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def kernels(device: str, layers: int, hidden: int, models: int, methods: list[str]) -> list[tuple[str, str]]:
    import torch
    from merge_kernels import best_time, model_shapes, run_method

    dev, dtype = torch.device(device), torch.bfloat16
    shapes = model_shapes(hidden, hidden * 11 // 4, layers, 32000, hidden // 4)
    g = torch.Generator(device=dev).manual_seed(0)
    base = {n: torch.randn(s, generator=g, device=dev, dtype=dtype) for n, s in shapes.items()}
    deltas = {n: [torch.randn(s, generator=g, device=dev, dtype=dtype) * 0.01 for _ in range(models)]
              for n, s in shapes.items()}
    out = {n: torch.empty_like(b) for n, b in base.items()}
    params = sum(b.numel() for b in base.values())

    def copy_all():
        for n, b in base.items():
            out[n].copy_(b)

    copy_s = best_time(copy_all, dev, 2)
    rows = [("kernels", f"{params / 1e6:.0f}M bf16 parameters, {models} task vectors, copy {copy_s * 1e3:.0f} ms")]
    from optimizer.merge import fused
    from optimizer.merge.registry import METHODS

    why_not = fused.available(dev)
    modes = ["eager"] if why_not else ["fused", "eager"]
    if why_not:
        rows.append(("kernels fused", f"unavailable: {why_not}"))
    for name, mode in ((n, m) for n in methods for m in modes):
        fused.enable(mode == "fused")
        try:
            start = time.perf_counter()
            run_method(name, base, deltas, out, models)  # the first call compiles a fused variant
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            first = time.perf_counter() - start
            t = best_time(lambda name=name: run_method(name, base, deltas, out, models), dev, 2)
        finally:
            fused.enable(False)
        k = 1 if METHODS[name].max_models == 1 else models  # as merge_kernels.py counts the bytes moved
        if mode == "fused" and METHODS[name].stochastic:
            mode = "fused on; random masks stay eager"
        rows.append((f"kernel {name} ({mode})", f"{t * 1e3:.0f} ms per merge ({(k + 2) / 2 * copy_s / t:.2f}x copy "
                                                f"speed; first call {first:.1f} s)"))
    return rows


def trial_cost(device: str, extra: list[str], timeout: float, work: Path) -> list[tuple[str, str]]:
    out = work / "trial_cost.json"
    cmd = [sys.executable, str(HERE / "trial_cost.py"), "--device", device, "--json", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        return [("trial cost", f"failed (rc {proc.returncode}): {(proc.stderr or proc.stdout)[-300:]!r}")]
    data = json.loads(out.read_text())
    rows = [("trial cost", data["table"].splitlines()[0])]
    for method, r in data["rows"].items():
        mk = r.get("mk")
        speed = f", {mk['wall'] / r['steady']:.0f}x faster than mergekit ({mk['wall']:.1f} s)" if mk else ""
        rows.append((f"trial cost {method}",
                     f"materialise first {r['first']:.3f} s / steady {r['steady']:.3f} s{speed}; evaluation "
                     f"{r['eval']:.2f} s; peak RSS {r['peak_rss'] / 2**30:.2f} GiB"))
    return rows


_TRIAL = re.compile(r"trial\s+(\d+).*merge ([\d.]+)s eval ([\d.]+)s")


def demo_study(device: str, trials: int, timeout: float, work: Path) -> list[tuple[str, str]]:
    cmd = [sys.executable, "-m", "optimizer", f"device={device}", f"n_trials={trials}", "study_name=gpu_check",
           f"run_root={work / 'runs'}", "storage=memory", "export.enabled=false"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - start
    found = [(int(m[1]), float(m[2]), float(m[3])) for m in _TRIAL.finditer(proc.stdout + proc.stderr)]
    if proc.returncode != 0 or not found:
        return [("demo study", f"failed (rc {proc.returncode}): {(proc.stderr or proc.stdout)[-300:]!r}")]
    merge = [m for _, m, _ in found]
    evals = [e for _, _, e in found]
    later = slice(1, None) if len(found) > 1 else slice(None)
    return [("demo study", f"{len(found)} trials in {wall:.0f} s (start-up included); per trial merge "
                           f"{statistics.median(merge):.3f} s, evaluation {statistics.median(evals):.2f} s "
                           f"(trial 0: {merge[0]:.3f} / {evals[0]:.2f} s; later median eval "
                           f"{statistics.median(evals[later]):.2f} s)")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kernel-layers", type=int, default=6)
    ap.add_argument("--kernel-hidden", type=int, default=1024)
    ap.add_argument("--kernel-models", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=["task_arithmetic", "ties", "dare_ties", "slerp"])
    ap.add_argument("--trial-cost-args", default="", help="extra arguments for trial_cost.py (sizes)")
    ap.add_argument("--trials", type=int, default=6, help="demo study trials")
    ap.add_argument("--budget", type=float, default=280.0, help="seconds for the whole check")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    import torch

    start = time.perf_counter()
    rows: list[tuple[str, str]] = []
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else "-"
    rows.append(("device", f"{args.device} ({gpu}); torch {torch.__version__}{'; ' + args.note if args.note else ''}"))

    def left() -> float:
        return max(10.0, args.budget - (time.perf_counter() - start))

    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        for label, part in (
            ("kernels", lambda: kernels(args.device, args.kernel_layers, args.kernel_hidden, args.kernel_models,
                                        args.methods)),
            ("trial cost", lambda: trial_cost(args.device, args.trial_cost_args.split(), left() * 0.7, work)),
            ("demo study", lambda: demo_study(args.device, args.trials, left(), work)),
        ):
            t0 = time.perf_counter()
            try:
                rows += part()
            except subprocess.TimeoutExpired:
                rows.append((label, "skipped: ran past the check's time budget"))
            except Exception as e:  # one failing part must not hide the others' numbers
                rows.append((label, f"failed: {type(e).__name__}: {e}"[:300]))
            rows.append((f"{label} seconds", f"{time.perf_counter() - t0:.0f}"))
    rows.append(("total seconds", f"{time.perf_counter() - start:.0f}"))
    width = max(len(k) for k, _ in rows)
    print("| check | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

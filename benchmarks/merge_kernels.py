"""Throughput of every registered merge kernel on a >=100M-parameter, Llama-shaped set of tensors.

Reports, per method, GB/s of the minimum bytes a merge must move (read base + task vectors, write the
result) and the ratio to a plain tensor copy of the same tensors measured in the same run: the cost of one
trial. "first call" is the first merge of a fresh set of task vectors: for TSV-M, Iso-C, Iso-CTS and WUDI it
includes their trial-independent SVDs / solve, which a study pays once (memoised), not per trial.

    python benchmarks/merge_kernels.py                       # cuda if available, else cpu; 2 task vectors
    python benchmarks/merge_kernels.py --models 3 --dtype bfloat16 --methods task_arithmetic ties
    python benchmarks/merge_kernels.py --kernels both   # each method with the compiled one-pass kernels and eager

With the compiled kernels (optimizer/merge/fused.py) "first call" includes compiling the variant (cached on
disk by Inductor: a second run of the script pays less).
"""

from __future__ import annotations

import argparse
import time

import torch

from optimizer.merge import fused
from optimizer.merge.registry import METHODS
from optimizer.merge.sparsify import seed_for
from optimizer.merge.tensor_ops import clear_memo

TARGETS = {"task_arithmetic": 0.8, "linear": 0.8, "ties": 0.3, "dare_ties": 0.3, "dare_linear": 0.3}


def model_shapes(hidden: int, inter: int, layers: int, vocab: int, kv: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a small Llama/Mistral-style decoder."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int) -> float:
    """Minimum wall time of ``repeats`` runs after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def n_inputs(name: str, n_models: int) -> int:
    """Task vectors the method merges in this benchmark (its limits applied to --models)."""
    m = METHODS[name]
    return max(m.min_models, min(n_models, m.max_models or n_models))


def run_method(name, base, deltas, out, n_models):
    m = METHODS[name]
    k = n_inputs(name, n_models)
    mp = {p.name: [p.default] * k for p in m.model_params}
    gp = {p.name: p.default for p in m.global_params}
    for tname, b in base.items():
        gen = None
        if m.stochastic:
            gen = torch.Generator(device=b.device).manual_seed(seed_for(0, 0, tname))
        m.fn(b, deltas[tname][:k], mp, gp, generator=gen, out=out[tname], name=tname)
    return k


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=2, help="task vectors per merge")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=sorted(METHODS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--kernels", default="eager", choices=["eager", "fused", "both"],
                    help="eager kernels, the compiled one-pass ones, or both side by side (fused needs a C++ "
                         "compiler on CPU, Triton on CUDA)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = model_shapes(args.hidden, args.hidden * 11 // 4, args.layers, 32000, args.hidden // 4)
    g = torch.Generator(device=device).manual_seed(0)
    base = {n: torch.randn(s, generator=g, device=device, dtype=dtype) for n, s in shapes.items()}
    deltas = {n: [torch.randn(s, generator=g, device=device, dtype=dtype) * 0.01 for _ in range(args.models)]
              for n, s in shapes.items()}
    out = {n: torch.empty_like(b) for n, b in base.items()}
    numel = sum(b.numel() for b in base.values())
    size = numel * base["lm_head.weight"].element_size()
    print(f"{device} {args.dtype}: {len(shapes)} tensors, {numel / 1e6:.0f}M parameters, "
          f"{args.models} task vectors, torch threads {torch.get_num_threads()}")

    def copy_all():
        for n, b in base.items():
            out[n].copy_(b)

    copy_gbs = 2 * size / best_time(copy_all, device, args.repeats) / 1e9
    rows = [("copy (reference)", f"{2 * size / 1e9:.2f}", "-", "-", f"{copy_gbs:.1f}", "1.00", "")]
    modes = ["fused", "eager"] if args.kernels == "both" else [args.kernels]
    why_not = fused.available(device)
    if "fused" in modes and why_not:
        print(f"fused kernels unavailable on {device}: {why_not}; eager only")
        modes = ["eager"]
    for name, mode in ((n, m) for n in args.methods for m in modes):
        fused.enable(mode == "fused")
        label = name if len(modes) == 1 else f"{name} ({mode})"
        k = n_inputs(name, args.models)
        clear_memo()  # a fresh study: the first call pays the trial-independent work
        start = time.perf_counter()
        run_method(name, base, deltas, out, args.models)
        _sync(device)
        first = time.perf_counter() - start
        t = best_time(lambda name=name: run_method(name, base, deltas, out, args.models), device, args.repeats)
        moved = (k + 2) * size
        ratio = moved / t / 1e9 / copy_gbs
        target = TARGETS.get(name)
        verdict = "" if target is None else ("meets" if ratio >= target else "below") + f" {target}x"
        rows.append((label, f"{moved / 1e9:.2f}", f"{first * 1e3:.0f}", f"{t * 1e3:.0f}", f"{moved / t / 1e9:.1f}",
                     f"{ratio:.2f}", verdict))
    clear_memo()
    fused.enable(False)
    _print(rows)


def _print(rows) -> None:
    header = ("method", "GB moved", "first call ms", "ms", "GB/s", "x copy", "target")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for r in (header, *rows):
            print("  ".join(f"{c:>16}" for c in r))
        return
    table = Table(*header)
    for r in rows:
        table.add_row(*r)
    Console().print(table)


if __name__ == "__main__":
    main()

"""What a study trial costs on a medium model set, against mergekit on the identical recipe, in one run.

Builds (once, cached) a Mistral-shaped bf16 model set: a base and K fine-tunes (base + seeded noise), each in
S safetensors shards, with the demo zoo's tokenizer, so the zoo tasks score it. Then, per merge method:
- a short study (`python -m optimizer models=custom ... n_trials=N`, layer-wise, random sampler, the zoo
  tasks with `--limit` items each, no export) in a child process: per-trial materialisation (trial 0 and
  the median of the later ones), evaluation per trial, the non-evaluation share of a steady trial, the load
  time and the process's peak RSS against (2 + K) x model bytes (resident base + K task vectors + the live
  model);
- with `--fused both` (default) that study twice, with the compiled one-pass merge kernels
  (`fused_kernels=on`) and with the eager ones (`off`), side by side;
- `mergekit-yaml` (if found) on trial 1's own recipe.yaml artifact (the second baseline), disk to disk, whole
  process: wall time and peak RSS; the speed-up is mergekit's whole process over our steady materialisation.

    python benchmarks/trial_cost.py                          # ~136M parameters (defaults below), 3 fine-tunes
    python benchmarks/trial_cost.py --layers 2 --hidden 256 --vocab 4096 --trials 3   # a small, quick run
    MERGEKIT_YAML=/tmp/mk-venv/bin/mergekit-yaml python benchmarks/trial_cost.py --methods ties

mergekit-yaml is looked up as --mergekit, $MERGEKIT_YAML, next to this Python, then on PATH; --mergekit none
skips it. A separate venv whose site-packages extend ours keeps mergekit out of the project venv:
    python -m venv /tmp/mk-venv && echo $PWD/.venv/lib/python3.11/site-packages \
        > /tmp/mk-venv/lib/python3.11/site-packages/main.pth && /tmp/mk-venv/bin/pip install mergekit
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


# --- the model set ---------------------------------------------------------------------------------------

def model_config(args: argparse.Namespace, tokenizer_ids: dict[str, int]):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=512, tie_word_embeddings=False,
                         torch_dtype="bfloat16", architectures=["MistralForCausalLM"], **tokenizer_ids)


def shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a MistralForCausalLM with `cfg` (the checkpoint layout transformers saves)."""
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    return out | {"model.norm.weight": (h,), "lm_head.weight": (cfg.vocab_size, h)}


def build_model_set(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """base/ and ft0..ft{K-1}/ under `root` (built once per size; a `done.json` marks a complete set)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from optimizer.zoo import ensure_zoo

    names = ["base", *(f"ft{i}" for i in range(args.models))]
    dirs = {n: root / n for n in names}
    if (root / "done.json").exists():
        return dirs
    tok = AutoTokenizer.from_pretrained(ensure_zoo() / "base")
    cfg = model_config(args, {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                              "pad_token_id": tok.pad_token_id})
    layout = shapes(cfg)
    base: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(args.seed)
    for name, shape in layout.items():
        if name.endswith("norm.weight"):
            base[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            base[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    per_shard = -(-sum(t.numel() for t in base.values()) // args.shards)
    for idx, model in enumerate(names):
        d = dirs[model]
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(args.seed + 1 + idx)
        state = base if model == "base" else {
            n: (t.float() + torch.randn(t.shape, generator=g) * (0.002 if "norm" not in n else 0.01)).to(torch.bfloat16)
            for n, t in base.items()}
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for n, t in state.items():
            if size >= per_shard * len(shards) and len(shards) < args.shards:
                shards.append({})
            shards[-1][n] = t
            size += t.numel()
        weight_map = {}
        for s, part in enumerate(shards):
            fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(part, str(d / fname), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, fname)
        total = sum(t.numel() * t.element_size() for t in state.values())
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        cfg.save_pretrained(d)
        tok.save_pretrained(d)
        del state
    (root / "done.json").write_text(json.dumps(vars(args), default=str))
    return dirs


# --- child processes (peak RSS of exactly one process) ---------------------------------------------------

def child_main(argv: list[str]) -> int:
    """`trial_cost.py --child OUT.json study|cmd ARGS...`: run, then write wall seconds, peak RSS, exit code."""
    import resource
    import runpy

    out, kind, rest = Path(argv[0]), argv[1], argv[2:]
    start, started = time.perf_counter(), time.time()
    rc = 0
    if kind == "study":
        sys.argv = ["optimizer", *rest]
        try:
            runpy.run_module("optimizer", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            rc = int(e.code or 0) if not isinstance(e.code, str) else 1
        who = resource.RUSAGE_SELF
    else:
        rc = subprocess.run(rest).returncode
        who = resource.RUSAGE_CHILDREN
    out.write_text(json.dumps({"rc": rc, "wall": time.perf_counter() - start, "started": started,
                               "peak_rss": resource.getrusage(who).ru_maxrss * 1024}))
    return 0


def run_child(kind: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, str(HERE), "--child", str(out), kind, *args]
    with open(log, "w") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT,
                       check=False)
    res = json.loads(out.read_text()) if out.stat().st_size else {"rc": -1}
    out.unlink()
    if res["rc"] != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"{kind} {' '.join(args[:3])}... failed (rc {res['rc']}); log: {log}")
    return res


# --- one method ------------------------------------------------------------------------------------------

def study(method: str, fused: str, dirs: dict[str, Path], work: Path, args: argparse.Namespace) -> dict:
    import optuna

    name = f"tc_{method}_{fused}"
    overrides = ["models=custom", f"models.base={dirs['base']}", "models.dtype=bfloat16",
                 *(f"+models.models.{m}={d}" for m, d in dirs.items() if m != "base"),
                 f"merge={method}", "mode=layer", "sampler=random", f"search={args.search}", f"n_trials={args.trials}",
                 f"study_name={name}", f"run_root={work}", "storage=sqlite", "export.enabled=false",
                 f"device={args.device}", "evaluator=zoo", f"evaluator.limit={args.limit}",
                 f"evaluator.batch_size={args.batch_size}", f"fused_kernels={fused}",
                 *([f"threads={args.threads}"] if args.threads else [])]
    res = run_child("study", overrides, work / f"{name}.log", thread_env(args.threads))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.load_study(study_name=name, storage=f"sqlite:///{work / name / 'study.db'}")
    trials = sorted((t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.number)
    merge = [t.user_attrs["merge_seconds"] for t in trials]
    evals = [t.user_attrs["eval_seconds"] for t in trials]
    dur = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    steady = slice(1, None)
    load = trials[0].datetime_start.timestamp() - res["started"]
    return {"trials": len(trials), "merge": merge, "first": merge[0], "steady": statistics.median(merge[steady]),
            "eval": statistics.median(evals), "share": statistics.median(
                (d - e) / d for d, e in zip(dur[steady], evals[steady], strict=True)),
            "peak_rss": res["peak_rss"], "wall": res["wall"], "load": load,
            "recipe": _trial_recipe(st, trials[1], work / name)}


def _trial_recipe(st, trial, run_dir: Path) -> str:
    """recipe.yaml as attached to `trial` (what `python -m optimizer.merge` and mergekit read)."""
    from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

    store = FileSystemArtifactStore(str(run_dir / "artifacts"))
    meta = next(m for m in get_all_artifact_meta(trial, storage=st._storage) if m.filename == "recipe.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        download_artifact(artifact_store=store, file_path=str(path), artifact_id=meta.artifact_id)
        return path.read_text()


def thread_env(threads: int | None) -> dict[str, str]:
    """The same CPU thread count for both tools' child processes (OpenMP/MKL read these at start-up)."""
    return {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} if threads else {}


def mergekit(recipe: str, method: str, work: Path, exe: str, threads: int | None) -> dict:
    path = work / f"mk_{method}.yaml"
    path.write_text(recipe)
    out = work / f"mk_{method}_out"
    shutil.rmtree(out, ignore_errors=True)
    res = run_child("cmd", [exe, str(path), str(out), "--device", "cpu"], work / f"mk_{method}.log",
                    thread_env(threads))
    shutil.rmtree(out, ignore_errors=True)
    return res


def find_mergekit(choice: str | None) -> str | None:
    if choice == "none":
        return None
    for c in (choice, os.environ.get("MERGEKIT_YAML"), str(Path(sys.executable).with_name("mergekit-yaml")),
              shutil.which("mergekit-yaml")):
        if c and Path(c).exists():
            return c
    return None


# --- report ----------------------------------------------------------------------------------------------

def table(rows: dict[str, dict], model_bytes: int, k: int, params: int, args: argparse.Namespace) -> str:
    gib = 2 ** 30
    budget = (2 + k) * model_bytes
    methods = list(rows)
    lines = [f"model set: {params / 1e6:.0f}M parameters, bf16, {model_bytes / 2**20:.0f} MiB per model, "
             f"{k} fine-tunes x {args.shards} shards; device {args.device}; zoo tasks, {args.limit} items each, "
             f"batch {args.batch_size}; {args.trials} trials per study (layer-wise, random sampler); CPU threads "
             f"{args.threads or 'auto'}",
             "| | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(rows[m]) for m in methods) + " |")

    def mk(r, key):
        return "-" if r.get("mk") is None else key(r["mk"])

    row("mergekit-yaml, whole process disk to disk", lambda r: mk(r, lambda x: f"{x['wall']:.1f} s"))
    row("mergekit-yaml peak RSS", lambda r: mk(r, lambda x: f"{x['peak_rss'] / gib:.2f} GiB"))
    row("ours: start-up to trial 0 (imports, validation, loading)", lambda r: f"{r['load']:.1f} s")
    row("ours: materialisation per trial (all)", lambda r: " / ".join(f"{x:.2f}" for x in r["merge"]) + " s")
    row("ours: first trial / steady (median of later)", lambda r: f"{r['first']:.2f} / {r['steady']:.2f} s")
    row("first / steady", lambda r: f"{r['first'] / r['steady']:.2f}x (target <= 2)")
    row("speed-up: mergekit whole process / our steady materialisation",
        lambda r: mk(r, lambda x: f"{x['wall'] / r['steady']:.0f}x (target >= 50)"))
    row("ours: evaluation per trial (median)", lambda r: f"{r['eval']:.1f} s")
    row("ours: non-evaluation share of a steady trial", lambda r: f"{100 * r['share']:.1f}%")
    row("ours: peak RSS of the study process", lambda r: f"{r['peak_rss'] / gib:.2f} GiB")
    row(f"(2 + K) x model bytes = {budget / gib:.2f} GiB; peak RSS minus that",
        lambda r: f"{(r['peak_rss'] - budget) / gib:+.2f} GiB (target <= +1)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=int(os.environ.get("TC_LAYERS", 14)))
    ap.add_argument("--hidden", type=int, default=int(os.environ.get("TC_HIDDEN", 768)))
    ap.add_argument("--inter", type=int, default=None, help="MLP width (default 8/3 x hidden, rounded to 64)")
    ap.add_argument("--vocab", type=int, default=int(os.environ.get("TC_VOCAB", 31744)))
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--models", type=int, default=3, help="fine-tunes (K)")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=int(os.environ.get("TC_TRIALS", 4)))
    ap.add_argument("--limit", type=int, default=int(os.environ.get("TC_LIMIT", 5)), help="items per zoo task")
    ap.add_argument("--batch-size", type=int, default=16, help="evaluator.batch_size")
    ap.add_argument("--methods", nargs="*", default=["task_arithmetic", "ties"])
    ap.add_argument("--search", default="plain",
                    help="search group of the studies (default plain: every trial sampled, which is what this "
                         "measures; `default` adds the gradient-refinement trial, whose backward pass needs "
                         "about one model of gradients plus activations on top)")
    ap.add_argument("--device", default=os.environ.get("DEVICE", "cpu"))
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both tools (default: the study's auto choice, torch's for mergekit); on a "
                         "shared machine 1 keeps other load from stalling multi-threaded kernels")
    ap.add_argument("--fused", default="both", choices=["both", "auto", "on", "off"],
                    help="fused_kernels of the studies; both (default): one study with the compiled kernels (on) "
                         "and one with the eager ones (off) per method, side by side")
    ap.add_argument("--mergekit", default=None, help="path to mergekit-yaml, or none")
    ap.add_argument("--out", default=None, help="model-set cache (default under the merge-optimizer cache)")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args(argv)
    if args.inter is None:
        args.inter = int(os.environ.get("TC_INTER", 0)) or (args.hidden * 8 // 3 + 63) // 64 * 64
    if args.hidden % args.heads:
        args.heads = max(h for h in range(1, args.heads + 1) if args.hidden % h == 0 and h % args.kv_heads == 0)

    from optimizer.zoo import cache_dir

    tag = f"L{args.layers}-H{args.hidden}-I{args.inter}-V{args.vocab}-K{args.models}-S{args.shards}-s{args.seed}"
    root = Path(args.out) if args.out else cache_dir() / "bench" / f"trial_cost-{tag}"
    t0 = time.perf_counter()
    dirs = build_model_set(root, args)
    print(f"model set {root} ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    exe = find_mergekit(args.mergekit)
    if exe is None:
        print("mergekit-yaml not found: mergekit rows left empty (see --mergekit)", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="trial_cost-") as tmp:
        work = Path(tmp)
        modes = ["on", "off"] if args.fused == "both" else [args.fused]
        for method in args.methods:
            cols = []
            for mode in modes:
                print(f"{method}: study, fused_kernels={mode} ...", flush=True)
                col = f"{method} ({'fused' if mode == 'on' else 'eager' if mode == 'off' else mode})"
                rows[col] = study(method, mode, dirs, work, args)
                cols.append(col)
            mk = None
            if exe:
                print(f"{method}: mergekit-yaml ...", flush=True)
                mk = mergekit(rows[cols[0]]["recipe"], method, work, exe, args.threads)
            for col in cols:
                rows[col]["mk"] = mk
    index = json.loads((dirs["base"] / "model.safetensors.index.json").read_text())
    model_bytes = index["metadata"]["total_size"]
    text = table(rows, model_bytes, args.models, model_bytes // 2, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": {m: {k: v for k, v in r.items() if k != "recipe"}
                                                       for m, r in rows.items()}, "table": text}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

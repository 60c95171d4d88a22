"""Evaluation cost per trial on the demo zoo: lm-eval's `evaluate` per call (the path used before the engine)
against the engine (requests built once) with lm-eval's own loglikelihood scoring and with shared-context
scoring (the default: one context pass per multiple-choice item), side by side in one process, same HFLM,
same model.

Rows: one whole pass over the search split, and the same items in chunks (as per-item pruning scores them).
Each repeat runs the three paths back to back (interleaved, so machine load hits them alike); the table shows
medians of wall and CPU seconds and the ratio engine / old. Scores are checked identical in the same run.

    python benchmarks/eval_cost.py                     # 5 repeats, chunk 30, search split
    python benchmarks/eval_cost.py --repeats 3 --chunk 50 --split heldout --model rev
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")


def old_path(lm, tasks, indices, chunk: int | None):
    """What LmEvalEvaluator did per trial before the engine: `evaluate` per call (per chunk)."""
    from lm_eval.evaluator import evaluate

    longest = max(len(v) for v in indices.values())
    step = chunk or longest
    acc: dict[str, list[float]] = {k: [] for k in indices}
    for start in range(0, longest, step):
        part = {k: v[start:start + step] for k, v in indices.items() if v[start:start + step]}
        with contextlib.redirect_stderr(io.StringIO()):
            out = evaluate(lm, tasks, samples=part, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
        for k in part:
            acc[k] += [float(s["acc"]) for s in out["samples"][k]]
    return {k: sum(v) / len(v) for k, v in acc.items()}


def new_path(engine, prepared, chunk: int | None):
    from optimizer.eval.engine import merge_runs

    longest = max(len(p) for p in prepared)
    step = chunk or longest
    runs: dict[str, list] = {p.name: [] for p in prepared}
    for start in range(0, longest, step):
        parts = [(p, range(start, min(start + step, len(p)))) for p in prepared if start < len(p)]
        for (p, _), run in zip(parts, engine.run(parts), strict=True):
            runs[p.name].append(run)
    return {k: merge_runs(v).aggregate()["acc,none"] for k, v in runs.items()}


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=30)
    ap.add_argument("--split", default="search", choices=["search", "heldout"])
    ap.add_argument("--model", default="base", help="zoo model to score")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the runner uses 1 for the zoo)")
    args = ap.parse_args(argv)

    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.eval.engine import Engine, prepare_task
    from optimizer.eval.tasks import load_tasks, task_manager
    from optimizer.zoo import TASKS_DIR, ZOO_TASKS, ZOO_TASKS_HELDOUT, ensure_zoo

    torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    zoo = ensure_zoo()
    names = list(ZOO_TASKS if args.split == "search" else ZOO_TASKS_HELDOUT)
    model = AutoModelForCausalLM.from_pretrained(zoo / args.model).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(zoo / args.model), batch_size=64,
              max_length=128)
    manager = task_manager([TASKS_DIR], names, metadata={"zoo_dir": str(zoo)})
    old_tasks = {"tasks": load_tasks(manager, names, "old path"), "groups": {}}
    new_tasks = load_tasks(manager, names, "engine")
    indices = {n: list(range(len(old_tasks["tasks"][n].eval_docs))) for n in names}
    (prepared, prep_s, _) = timed(lambda: [prepare_task(n, new_tasks[n], indices[n]) for n in names])
    engines = {"engine": Engine(lm, share_context=False), "engine + shared context": Engine(lm)}
    rows = {}
    for label, chunk in (("whole split", None), (f"chunks of {args.chunk}", args.chunk)):
        times: dict[str, list[tuple[float, float]]] = {"old": [], **{k: [] for k in engines}}
        for engine in engines.values():  # warm-up (first-call tokenisation, allocator, the shared check)
            new_path(engine, prepared, chunk)
        old_path(lm, old_tasks, indices, chunk)
        for _ in range(args.repeats):
            old, w, c = timed(lambda chunk=chunk: old_path(lm, old_tasks, indices, chunk))
            times["old"].append((w, c))
            for name, engine in engines.items():
                new, w, c = timed(lambda chunk=chunk, engine=engine: new_path(engine, prepared, chunk))
                times[name].append((w, c))
                if old != new:
                    raise SystemExit(f"scores differ: old {old} vs {name} {new}")
        rows[label] = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
                       for k, v in times.items()}
    n_items = sum(len(v) for v in indices.values())
    print(f"demo zoo, {args.split} split ({n_items} items, {sum(len(i.instances) for p in prepared for i in p.items)} "
          f"requests), model {args.model}, {args.repeats} repeats, torch threads {torch.get_num_threads()}; "
          f"engine request build once: {prep_s:.2f} s; scores identical: yes")
    print("| | path | wall s | wall ratio | CPU s | CPU ratio |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        ow, oc = r["old"]
        for name, (w, c) in r.items():
            print(f"| {label} | {name} | {w:.3f} | {w / ow:.2f} | {c:.3f} | {c / oc:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does per-item pruning pay on the demo zoo? The same TPE study (same seed) without and with Wilcoxon pruning.

Runs `python -m optimizer sampler=tpe n_trials=N seed=S` twice in child processes, the second with
`pruner=wilcoxon evaluator.chunk_size=C evaluator.shuffle=true`, each with the usual export (held-out
re-evaluation of the top 5, the best held-out one exported). Reports per study: evaluation seconds summed over
all trials (pruned ones up to where they stopped), items scored, trials pruned, the best search value, the
exported trial's held-out score, and the process's CPU seconds; then the saving of evaluation time.

    python benchmarks/pruning_cost.py                          # 30 trials, seed 0, chunk 30
    python benchmarks/pruning_cost.py --trials 20 --seeds 0 1 --chunk 20
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ITEMS = 450  # items of a full search-split evaluation of the demo zoo (3 tasks x 150)


def run_study(work: Path, name: str, overrides: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, "-m", "optimizer", *overrides, f"study_name={name}", f"run_root={work}", "storage=sqlite"]
    with open(work / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "TQDM_DISABLE": "1"}).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        sys.stderr.write((work / f"{name}.log").read_text()[-3000:])
        raise SystemExit(f"study {name} failed (rc {rc})")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.load_study(study_name=name, storage=f"sqlite:///{work / name / 'study.db'}")
    done = [t for t in st.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    full = ITEMS
    heldout = st.user_attrs.get("heldout", {})  # the top-k trials' held-out scores, cached by the export
    complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE]
    top = sorted(complete, key=lambda t: (-t.value, t.number))[:5]  # what the export chooses among
    return {
        "trials": len(done),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in done),
        "eval_seconds": sum(float(t.user_attrs.get("eval_seconds", 0.0)) for t in done),
        "items": sum(int(t.user_attrs.get("pruned_after_items", full)) for t in done),
        "items_full": full * len(done),
        "best_search": st.best_value,
        "best_trial": st.best_trial.number,
        "heldout_top": max((heldout[str(t.number)]["objective"] for t in top if str(t.number) in heldout),
                           default=float("nan")),
        "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--chunk", type=int, default=30)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pruning_cost-") as tmp:
        work = Path(tmp)
        for seed in args.seeds:
            base = ["sampler=tpe", f"n_trials={args.trials}", f"seed={seed}"]
            plain = run_study(work, f"plain_s{seed}", base)
            pruned = run_study(work, f"wilcoxon_s{seed}",
                               [*base, "pruner=wilcoxon", f"evaluator.chunk_size={args.chunk}", "evaluator.shuffle=true"])
            rows.append((seed, plain, pruned))
    print(f"demo zoo, TPE, {args.trials} trials per study; pruning: wilcoxon, chunk {args.chunk}, shuffled items")
    print("| seed | study | eval s (all trials) | items scored | pruned trials | best search | best held-out "
          "(top 5) | process CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, plain, pruned in rows:
        for label, r in (("no pruning", plain), ("wilcoxon", pruned)):
            print(f"| {seed} | {label} | {r['eval_seconds']:.1f} | {r['items']} / {r['items_full']} | {r['pruned']} | "
                  f"{r['best_search']:.4f} (#{r['best_trial']}) | {r['heldout_top']:.4f} | {r['cpu_seconds']:.0f} |")
        saving = 1 - pruned["eval_seconds"] / plain["eval_seconds"]
        items = 1 - pruned["items"] / plain["items"]
        print(f"| {seed} | saving | {100 * saving:.0f}% of evaluation time | {100 * items:.0f}% of items | | | "
              f"{pruned['heldout_top'] - plain['heldout_top']:+.4f} | "
              f"{100 * (1 - pruned['cpu_seconds'] / plain['cpu_seconds']):.0f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

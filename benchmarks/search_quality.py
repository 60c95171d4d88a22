"""Search quality on the demo zoo: strategies x seeds x budgets through the real CLI, one table, CSV and PNG.

    python benchmarks/search_quality.py                      # the default strategies, seeds 0 1 2, 25/50/150
    python benchmarks/search_quality.py --strategies default,ties --budgets 50 --seeds 0,1,2,3,4

Every cell is `python -m optimizer mode=layer sampler=cmaes n_trials=N seed=S <strategy overrides>` in its own
study (a subprocess, `nice -n 10`, at most `--jobs` at a time), then its `best/scores.json`: the exported
trial's held-out mean (the best held-out among the top-5 by search and every baseline, as the product
chooses), the best baseline, the best expert and the base, all as the run itself measured them.
A strategy whose schedule does not depend on the budget (one sample stage, or only fixed-size stages before
the last) runs once per seed and is resumed to each larger budget (`n_trials` is a total): its 25 and 50
rows are the prefixes of its 150 run ("prefix" in the table). Strategies with budget-shaped stages (shares
of the budget) get their own run per budget ("own").

Columns: best held-out mean (median and min over seeds), its gain over the best baseline / best expert /
base (median), normalized accuracy (per skill: merged / that skill's own expert, then the mean; median),
search-vs-held-out gap of the exported trial (median), trials to the first searched trial whose search
score beats the best baseline's (median; ">N" when none did), wall seconds (median, whole command incl.
loading and export; cumulative for prefixes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MISSION = ["mode=layer", "sampler=cmaes"]  # the mission's command; n_trials and seed are added per cell


@dataclass(frozen=True)
class Strategy:
    name: str
    overrides: tuple[str, ...]
    help: str


STRATEGIES = {s.name: s for s in (
    Strategy("default", (), "the mission's command as shipped (search=default: refine -> per model -> per kind -> "
                            "CMA-ES; coarse stages skipped once the best trial is finer)"),
    Strategy("centre", ("search=plain", "sampler.kwargs={}"), "before: CMA-ES from the box centre, sigma range/6"),
    Strategy("warm", ("search=warm",), "CMA-ES from the best baseline, sigma0 0.1"),
    Strategy("coarse", ("search=coarse",), "per model (GP) -> per kind (GP) -> per layer (CMA-ES)"),
    Strategy("refine", ("search=refine",), "gradient refinement of the best baseline, then CMA-ES from it"),
    Strategy("polish", ("search=polish",), "refine, CMA-ES from it, and a last refinement of the best trial"),
    Strategy("ties", ("merge=ties",), "TIES (weight + density per layer), default search (refine skipped: "
                                      "not linear in the weights, so per model -> per kind -> CMA-ES)"),
    Strategy("ties-warm", ("merge=ties", "search=warm"), "TIES, CMA-ES from the best baseline only"),
    Strategy("ties-centre", ("merge=ties", "search=plain", "sampler.kwargs={}"), "TIES, CMA-ES from the centre"),
)}


@dataclass
class Cell:
    strategy: str
    seed: int
    budget: int
    source: str  # own | prefix
    wall: float
    scores: dict = field(repr=False)
    trials: list = field(repr=False)


def budget_independent(overrides: tuple[str, ...]) -> bool:
    """True when the strategy's stages before the last have fixed sizes (so a resumed run is a prefix)."""
    from hydra import compose, initialize_config_dir

    from optimizer.config import register_configs
    from optimizer.resources import CONF_DIR

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[*MISSION, *overrides])
    stages = list(cfg.search.stages)
    samples = [i for i, st in enumerate(stages) if st.kind == "sample"]
    return all(st.kind == "refine" or st.trials >= 1 for i, st in enumerate(stages) if samples and i != samples[-1])


def run_cell(strategy: Strategy, seed: int, budget: int, run_root: Path, study: str, log: Path) -> float:
    cmd = ["nice", "-n", "10", sys.executable, "-m", "optimizer", *MISSION, *strategy.overrides,
           f"n_trials={budget}", f"seed={seed}", f"study_name={study}", f"run_root={run_root}"]
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; see {log}")
    return time.perf_counter() - t0


def study_trials(run_root: Path, study: str) -> list[dict]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.load_study(study_name=study, storage=f"sqlite:///{run_root / study / 'study.db'}")
    return [{"number": t.number, "value": t.value, "baseline": t.user_attrs.get("baseline"),
             "stage": t.user_attrs.get("stage")} for t in st.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE]


def run_strategy_seed(strategy: Strategy, seed: int, budgets: list[int], run_root: Path, logs: Path,
                      chain: bool) -> list[Cell]:
    """One seed of one strategy: a resumed chain of budgets (`chain`), or one run per budget."""
    cells = []
    log = logs / f"{strategy.name}_s{seed}.log"
    wall = 0.0
    for b in sorted(budgets):
        study = f"sq_{strategy.name}_s{seed}" + ("" if chain else f"_n{b}")
        took = run_cell(strategy, seed, b, run_root, study, log)
        wall = wall + took if chain else took
        scores = json.loads((run_root / study / "best" / "scores.json").read_text())
        cells.append(Cell(strategy.name, seed, b, "prefix" if chain and b != max(budgets) else "own", wall,
                          scores, study_trials(run_root, study)))
        print(f"  {strategy.name} seed {seed} n={b}: held-out {heldout(scores):.4f} ({took:.0f}s)", flush=True)
    return cells


def heldout(scores: dict) -> float:
    return float(scores["best"]["heldout"]["objective"])


def metrics(cell: Cell) -> dict:
    sc = cell.scores
    split = "heldout"
    comp = sc.get("comparison", {})
    rows = {r["what"]: r for r in comp.get("rows", [])}
    best = heldout(sc)
    base_row, expert_row, anchor_row = rows.get("best baseline"), rows.get("best expert"), rows.get("base")
    refs = sc.get("references", {})
    tasks = sc["best"][split]["tasks"]
    norm = []
    for task, value in tasks.items():
        own = next((n for n in refs if n not in ("base", "target") and n in task), None)
        if own is not None and refs[own][split]["tasks"].get(task):
            norm.append(value / refs[own][split]["tasks"][task])
    base_search = max((t["value"] for t in cell.trials if t["baseline"]), default=None)
    first = next((i + 1 for i, t in enumerate(cell.trials) if not t["baseline"] and base_search is not None
                  and t["value"] > base_search), None)
    return {
        "strategy": cell.strategy, "seed": cell.seed, "budget": cell.budget, "source": cell.source,
        "exported_trial": sc["best"]["trial"], "exported_stage": next(
            (t["stage"] for t in cell.trials if t["number"] == sc["best"]["trial"]), None),
        "heldout": best, "search": float(sc["best"]["search"]["objective"]),
        "best_baseline": base_row[split] if base_row else None,
        "gain_baseline": best - base_row[split] if base_row else None,
        "gain_expert": best - expert_row[split] if expert_row else None,
        "gain_base": best - anchor_row[split] if anchor_row else None,
        "normalized": statistics.mean(norm) if norm else None,
        "gap": float(sc["best"]["search"]["objective"]) - best,
        "first_beat": first, "baseline_wins": bool(comp.get("baseline_wins")), "wall_s": round(cell.wall, 1),
    }


def _med(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["budget"]), []).append(r)
    head = ("| strategy | trials | runs | seeds | held-out median | min | vs best baseline | vs best expert | "
            "vs base | normalized | gap | trials to beat baseline | wall s |")
    out = [head, "|" + "|".join(["---"] * 13) + "|"]
    for (name, budget), rs in groups.items():
        def f(key: str, fmt: str = "{:.3f}", signed: bool = False, rs: list = rs) -> str:
            v = _med([r[key] for r in rs])
            if v is None:
                return "-"
            return ("{:+.3f}" if signed else fmt).format(v)

        firsts = [r["first_beat"] for r in rs]
        beat = _med([x for x in firsts if x is not None])
        beat_s = "-" if beat is None else f"{beat:.0f}"
        if any(x is None for x in firsts):
            beat_s += f" ({sum(x is None for x in firsts)} never)"
        out.append(f"| {name} | {budget} | {rs[0]['source']} | {len(rs)} | {f('heldout')} | "
                   f"{min(r['heldout'] for r in rs):.3f} | {f('gain_baseline', signed=True)} | "
                   f"{f('gain_expert', signed=True)} | {f('gain_base', signed=True)} | {f('normalized')} | "
                   f"{f('gap', signed=True)} | {beat_s} | {f('wall_s', '{:.0f}')} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = list(dict.fromkeys(r["strategy"] for r in rows))
    for name in names:
        mine = [r for r in rows if r["strategy"] == name]
        budgets = sorted({r["budget"] for r in mine})
        med = [_med([r["heldout"] for r in mine if r["budget"] == b]) for b in budgets]
        lo = [min(r["heldout"] for r in mine if r["budget"] == b) for b in budgets]
        hi = [max(r["heldout"] for r in mine if r["budget"] == b) for b in budgets]
        line, = ax.plot(budgets, med, marker="o", label=name)
        ax.fill_between(budgets, lo, hi, color=line.get_color(), alpha=0.15)
    base = _med([r["best_baseline"] for r in rows if r["best_baseline"] is not None])
    if base is not None:
        ax.axhline(base, color="grey", ls="--", lw=1, label="best baseline")
    ax.set_xlabel("trials (n_trials)")
    ax.set_ylabel("best held-out mean (median; band = min..max over seeds)")
    ax.set_title("search quality on the demo zoo")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="centre,warm,default,ties,ties-centre",
                    help=f"comma-separated, from {sorted(STRATEGIES)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budgets", default="25,50,150")
    ap.add_argument("--jobs", type=int, default=2, help="commands at a time (default 2)")
    ap.add_argument("--out", default=str(ROOT / "out" / "search_quality"))
    args = ap.parse_args(argv)
    names = [n for n in args.strategies.split(",") if n]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        ap.error(f"unknown strategies {unknown}; choose from {sorted(STRATEGIES)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    budgets = sorted(int(x) for x in args.budgets.split(","))
    out = Path(args.out)
    run_root, logs = out / "runs", out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    chains = {n: budget_independent(STRATEGIES[n].overrides) for n in names}  # Hydra: one thread at a time
    jobs = [(STRATEGIES[n], s) for n in names for s in seeds]
    print(f"{len(jobs)} strategy x seed jobs, budgets {budgets}, {args.jobs} at a time; logs in {logs}", flush=True)

    def job(j: tuple[Strategy, int]) -> list[Cell]:
        try:
            return run_strategy_seed(j[0], j[1], budgets, run_root, logs, chains[j[0].name])
        except Exception as e:  # one failed command must not lose the other cells
            print(f"  FAILED {j[0].name} seed {j[1]}: {e}", flush=True)
            return []

    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        results = list(pool.map(job, jobs))
    rows = sorted((metrics(c) for cells in results for c in cells),
                  key=lambda r: (names.index(r["strategy"]), r["budget"], r["seed"]))
    with open(out / "search_quality.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    text = table(rows)
    (out / "search_quality.md").write_text(text + "\n", encoding="utf-8")
    print()
    print(text)
    print()
    for n in names:
        print(f"  {n}: {STRATEGIES[n].help}; overrides: {' '.join(STRATEGIES[n].overrides) or '(none)'}")
    print('runs "prefix": the rows of budget-independent strategies come from one run per seed resumed to each '
          'budget; "own": a separate run per budget.')
    if plot(rows, out / "search_quality.png"):
        print(f"plot: {out / 'search_quality.png'}")
    print(f"csv: {out / 'search_quality.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

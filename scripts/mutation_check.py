"""Mutation check: break the product on purpose, one mutation at a time, and show which tests notice.

    .venv/bin/python scripts/mutation_check.py                 # every mutation (about 5-10 min on 2 cores)
    .venv/bin/python scripts/mutation_check.py --only ties_sign_flipped heldout_guard_skipped
    .venv/bin/python scripts/mutation_check.py --list

Each mutation replaces one exact piece of source text (which must occur exactly once) in a temporary copy of
`optimizer/` and `tests/` (the working tree is never touched), then runs the tests chosen for it there, with
PYTHONPATH pointing at the copy, stopping at the first failure. A first run of every selected test on the
unmutated copy records tests that fail already (others' work in progress, say); they are deselected, so a
mutation only counts as caught by a test that passed before it. Prints a table mutation -> first failing
test and exits 1 if any mutation survives (or no longer applies: its source text changed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments (paths, node ids, -k expressions)
    what: str


MUTATIONS = [
    Mutation("ties_sign_flipped", "optimizer/merge/task_arithmetic.py",
             "sg.sign_().add_(0.5).sign_()", "sg.sign_().add_(0.5).sign_().neg_()",
             ("tests/merge/test_merge_conformance.py",),
             "TIES elects the minority sign"),
    Mutation("normalisation_dropped", "optimizer/merge/task_arithmetic.py",
             "div = total if normalize and abs(total) >= 1e-8 else 1.0", "div = 1.0",
             ("tests/merge/test_merge_conformance.py", "tests/merge/test_merge_edges.py"),
             "normalize=true no longer divides by the weight sum (linear, task arithmetic)"),
    Mutation("consensus_normalisation_dropped", "optimizer/merge/task_arithmetic.py",
             "        mixed.div_(div.clamp_(min=1e-30))", "        pass",
             ("tests/merge/test_merge_conformance.py",),
             "TIES-style merges no longer divide by the agreeing weights"),
    Mutation("dare_l1_rescale_broken", "optimizer/merge/task_arithmetic.py",
             "term.coef *= term.l1_ratio()", "term.coef *= 1.0",
             ("tests/merge/test_merge_conformance.py", "tests/merge/test_merge_sparsify.py"),
             "DARE/DELLA keep the dropped mass out (no L1 rescale, mergekit's default)"),
    Mutation("dare_inverse_density_broken", "optimizer/merge/task_arithmetic.py",
             "term.coef /= density", "term.coef /= 1.0",
             ("tests/merge/test_merge_conformance.py", "tests/merge/test_merge_sparsify.py"),
             "rescale=inverse_density (the papers') does nothing"),
    Mutation("dare_mask_inverted", "optimizer/merge/sparsify.py",
             "torch.lt(uniform16(stop - start, generator, delta.device), thr, out=out[start:stop])",
             "torch.ge(uniform16(stop - start, generator, delta.device), thr, out=out[start:stop])",
             ("tests/merge/test_merge_sparsify.py",),
             "DARE keeps 1 - density of the entries"),
    Mutation("lambda_ignored", "optimizer/merge/task_arithmetic.py",
             "t.coef *= lambda_ / div", "t.coef *= 1.0 / div",
             ("tests/merge/test_merge_conformance.py",),
             "task arithmetic ignores its lambda"),
    Mutation("slerp_ends_swapped", "optimizer/merge/kernels.py",
             "return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)",
             "return math.sin(t * omega) / math.sin(omega), math.sin((1 - t) * omega) / math.sin(omega)",
             ("tests/merge/test_merge_conformance.py", "tests/merge/test_merge_edges.py"),
             "SLERP interpolates from the wrong end"),
    Mutation("layer_index_off_by_one", "optimizer/space.py",
             "layer_filter = f\"{m['prefix']}{m['idx']}.\"", "layer_filter = f\"{m['prefix']}{int(m['idx']) + 1}.\"",
             ("tests/test_space.py", "tests/merge/test_apply.py"),
             "layer i's coefficient lands on layer i+1 (mode=layer/block)"),
    Mutation("moe_slot_takes_expert_0", "optimizer/moe/search.py",
             "[res.deltas[name][i]]", "[res.deltas[name][0]]",
             ("tests/merge/test_applier_conformance.py", "tests/moe/test_search.py"),
             "every MoE slot is written from the first expert"),
    Mutation("heldout_guard_skipped", "optimizer/export/heldout.py",
             'return next(t for t in study.get_trials(deepcopy=False) if t.number == best["trial"]), table',
             "return study.best_trial, table",
             ("tests/export/test_heldout.py", "tests/test_mutation_guards.py"),
             "export takes the best search trial, not the best held-out one of the top-k"),
    Mutation("heldout_scored_on_search", "optimizer/session.py",
             "scores = s.evaluator.evaluate(s.live, s.tokenizer, split, on_item=on_item)",
             "scores = s.evaluator.evaluate(s.live, s.tokenizer, SEARCH, on_item=on_item)",
             ("tests/export/test_heldout.py",),
             "every 'held-out' score is a search-split score"),
    Mutation("resume_check_skipped", "optimizer/fingerprint.py",
             "    if key is None:\n        return True", "    if True:\n        return True",
             ("tests/test_runner.py::test_incompatible_resume_is_refused_and_nothing_is_added",),
             "a study is resumed with a different search space"),
    Mutation("resume_replays_draws", "optimizer/search/loop.py",  # each stage's sampler is built there
             "study.sampler = stage_sampler(s, stage, start, s.cfg.seed + done)",
             "study.sampler = stage_sampler(s, stage, start, s.cfg.seed)",
             ("tests/test_conformance.py", "-k", "storage and sqlite"),
             "a resumed run draws its first trials again"),
    Mutation("baselines_not_enqueued", "optimizer/runner.py",
             '            study.enqueue_trial(params, user_attrs={"baseline": label})', "            pass",
             ("tests/test_runner.py::test_rerun_reaches_the_total_and_baselines_come_first",),
             "the classic recipes are never tried first"),
    Mutation("median_pruner_gets_items", "optimizer/runner.py",
             "self.items_pruner = pruner if isinstance(pruner, ItemWilcoxonPruner) else None",
             "self.items_pruner = pruner",
             ("tests/test_conformance.py", "-k", "pruner_runs and median"),
             "pruner=median is handed item lists instead of a learning curve"),
    Mutation("finished_items_not_stored", "optimizer/runner.py",
             "            self.trial.set_user_attr(ITEMS, self.items)\n", "            pass\n",
             ("tests/test_pruning.py",),
             "finished trials keep no item scores: the Wilcoxon pruner has nothing to compare with, never prunes"),
    Mutation("shared_context_drops_tokens", "optimizer/eval/shared_context.py",
             "rows = torch.cat([rows, later[r, : len(c) - 1]], dim=0)", "rows = rows",
             ("tests/eval/test_shared_context.py",),
             "multi-token choices are scored on their first token only"),
    Mutation("fused_tie_split_off_by_one", "optimizer/merge/fused.py",
             "keep = a > torch.where(pos < cut_lo[i], lo[0, i], lo[1, i])",
             "keep = a > torch.where(pos <= cut_lo[i], lo[0, i], lo[1, i])",
             ("tests/merge/test_fused.py",),
             "the compiled TIES mask keeps one tied element too many"),
    Mutation("fused_consensus_ignores_lambda", "optimizer/merge/fused.py",
             "acc = acc + (mixed * sg) * lam", "acc = acc + (mixed * sg)",
             ("tests/merge/test_fused.py",),
             "the compiled consensus merge drops lambda"),
    Mutation("fused_weighted_sum_unscaled_base", "optimizer/merge/fused.py",
             "        acc = acc * coefs[-1]\n", "        acc = acc\n",
             ("tests/merge/test_fused.py",),
             "the compiled weighted sum ignores the base's coefficient (linear without normalisation, slerp)"),
    Mutation("export_masks_of_trial_0", "optimizer/export/write.py",
             "s.applier.apply(plan, seed=s.cfg.seed, trial=trial.number)", "s.applier.apply(plan, seed=s.cfg.seed, trial=0)",
             ("tests/merge/test_roundtrip.py",),
             "the exported model of a DARE trial has another trial's masks"),
    Mutation("masks_ignore_trial", "optimizer/merge/apply.py",
             "gen.manual_seed(seed_for(seed, trial, name))", "gen.manual_seed(seed_for(seed, 0, name))",
             ("tests/merge/test_apply.py", "tests/merge/test_applier_conformance.py", "-k", "random or stochastic"),
             "every trial of a stochastic method draws the same masks"),
]

_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for part in ("optimizer", "tests"):
        shutil.copytree(ROOT / part, dest / part, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def pytest(copy: Path, args: list[str], *, first_failure: bool, timeout: int) -> tuple[int, list[str], float]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-W", "ignore",
           *(["-x"] if first_failure else []), *args]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, ["(timeout)"], time.perf_counter() - t0
    return done.returncode, _FAILED.findall(done.stdout), time.perf_counter() - t0


def check_isolation(copy: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(copy)}
    out = subprocess.run([sys.executable, "-c", "import optimizer; print(optimizer.__file__)"], cwd=copy, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy is not what Python imports ({out}); refusing to mutate")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per pytest run")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:34} {m.file:38} {m.what}")
        return 0
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutation(s): {sorted(unknown)}; see --list")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        check_isolation(copy)
        # Baseline: tests already failing on the unmutated copy cannot catch anything; deselect them.
        paths = sorted({a.split("::")[0] for m in chosen for a in m.tests if a.startswith("tests/")})
        _, broken, secs = pytest(copy, paths, first_failure=False, timeout=args.timeout * 3)
        print(f"baseline: {len(paths)} test files in {secs:.0f} s; failing before any mutation: "
              f"{', '.join(broken) or 'none'}", flush=True)
        deselect = [a for b in broken for a in ("--deselect", b)]
        rows = []
        for m in chosen:
            path = copy / m.file
            text = path.read_text(encoding="utf-8")
            n = text.count(m.old)
            if n != 1:
                rows.append((m, "NOT APPLIED", f"source text found {n} times", 0.0))
                continue
            path.write_text(text.replace(m.old, m.new), encoding="utf-8")
            try:
                rc, failed, secs = pytest(copy, [*m.tests, *deselect], first_failure=True, timeout=args.timeout)
            finally:
                path.write_text(text, encoding="utf-8")
            if failed:
                rows.append((m, "caught", failed[0], secs))
            elif rc == 5:
                rows.append((m, "NO TESTS", "the selection ran no test", secs))
            else:
                rows.append((m, "SURVIVED" if rc == 0 else "ERROR", f"pytest exit {rc}", secs))
            print(f"  {m.name}: {rows[-1][1]} ({secs:.0f} s)", flush=True)

    print("\n| mutation | what it breaks | result | first failing test | s |")
    print("|---|---|---|---|---|")
    for m, result, detail, secs in rows:
        print(f"| {m.name} | {m.what} | {result} | {detail} | {secs:.0f} |")
    bad = [m.name for m, result, *_ in rows if result != "caught"]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} mutations caught in {time.perf_counter() - start:.0f} s"
          + (f"; not caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

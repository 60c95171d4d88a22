"""How long one zoo model takes to score per split: the timing check that used to be a unit-test assertion
(`tests/zoo/test_zoo.py`, "< 30 s"), measured here instead, with the independent plain-torch scorer of
tests/zoo/zoo_independent.py in the same run as a reference.

    python benchmarks/zoo_scoring.py                 # kana expert, 3 repeats, 1 CPU thread
    python benchmarks/zoo_scoring.py --model add --repeats 5 --threads 2

Prints, per split: min / median seconds of `ZooScorer.score` (the optimizer's scorer) and of the reference,
and their ratio. On a quiet 2-core CPU the optimizer's scorer takes about 1 s per split.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="kana", help="zoo model folder name (default kana)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.zoo import ensure_zoo
    from optimizer.zoo.evaluate import ZooScorer

    sys.path.insert(0, str(ROOT / "tests" / "zoo"))
    from zoo_independent import SKILL_KIND, SPLITS, accuracy, read_split

    zoo = ensure_zoo()
    tok = AutoTokenizer.from_pretrained(zoo / "base")
    model = AutoModelForCausalLM.from_pretrained(zoo / args.model).eval()
    scorer = ZooScorer(model, tok, zoo)
    print(f"zoo model {args.model!r}, {args.repeats} repeats, {torch.get_num_threads()} thread(s)\n")
    print("| split | ZooScorer min s | median s | reference min s | median s | ratio (min) |")
    print("|---|---|---|---|---|---|")
    for split in SPLITS:
        data = {s: read_split(zoo, s, split) for s in SKILL_KIND}
        ours = _timed(lambda split=split: scorer.score(split), args.repeats)
        ref = _timed(lambda data=data: [accuracy(model, tok, data[s], k) for s, k in SKILL_KIND.items()],
                     args.repeats)
        print(f"| {split} | {min(ours):.2f} | {statistics.median(ours):.2f} | {min(ref):.2f} | "
              f"{statistics.median(ref):.2f} | {min(ours) / min(ref):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

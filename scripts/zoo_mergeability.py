"""Print base / experts / uniform task-arithmetic merges of the demo zoo on both splits.

    python scripts/zoo_mergeability.py [--zoo DIR] [--weights 0.5 0.7 1.0]

Exit 1 when no uniform merge beats the best single expert on the held-out 3-skill mean.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optimizer.zoo import ensure_zoo
from optimizer.zoo.__main__ import print_tables
from optimizer.zoo.mergeability import WEIGHTS, margin, mean, mergeability

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None)
    parser.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS))
    args = parser.parse_args()
    table = mergeability(ensure_zoo(args.zoo, progress=True), tuple(args.weights))
    print_tables({"accuracy": {split: {row: {**scores[split], "mean": mean(scores[split])}
                                       for row, scores in table.items()} for split in ("search", "heldout")}})
    gap = margin(table, "heldout")
    print(f"best uniform merge - best expert (held-out mean): {gap:+.3f}")
    sys.exit(0 if gap > 0 else 1)

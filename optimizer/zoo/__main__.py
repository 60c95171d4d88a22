"""`python -m optimizer.zoo [--out DIR] [--force]`: build the demo zoo (if needed) and print its scores.

Exit 0 when every expert (full and MLP-only) beats the base on its own skill, 1 (with the reason) when not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import EXPERTS, MANIFEST, MODELS, ensure_zoo, zoo_dir


def print_tables(manifest: dict) -> None:
    """Print the per-skill accuracy tables (rows: models, MLP-only experts and uniform merges; cols: skills
    and mean)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for split, rows in manifest["accuracy"].items():
        table = Table(title=f"accuracy ({split} split, lm-eval acc)")
        table.add_column("model")
        for col in (*EXPERTS, "mean"):
            table.add_column(col, justify="right")
        for name, scores in rows.items():
            table.add_row(name, *(f"{scores[c]:.3f}" for c in (*EXPERTS, "mean")),
                          end_section=name in (EXPERTS[-1], MODELS[-1]))
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m optimizer.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"zoo folder (default {zoo_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a current zoo exists")
    args = parser.parse_args(argv)

    from .build import ZooBuildError, check_experts

    try:
        root = ensure_zoo(args.out, force=args.force, progress=True)
        manifest = json.loads((root / MANIFEST).read_text())
        print_tables(manifest)
        acc = manifest["accuracy"]
        check_experts({row: {split: acc[split][row] for split in acc} for row in MODELS})
    except ZooBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"zoo ready at {root} (built in {manifest['build_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

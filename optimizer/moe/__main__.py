"""`python -m optimizer.moe MOE.yaml OUT_DIR`: build a frankenMoE (mergekit-moe schema) and save it.

Exit code 0 on success, 2 with a one-paragraph message on bad input.
"""

from __future__ import annotations

import argparse
import sys

from optimizer import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimizer.moe", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="MoE recipe YAML (mergekit-moe schema, e.g. optimizer/conf/moe/demo.yaml)")
    parser.add_argument("out_dir", help="folder to write the Mixtral model, tokenizer and moe.yaml into")
    parser.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:1, mps ...")
    args = parser.parse_args(argv)
    try:
        from optimizer.models import pick_device

        from .build import build_from_config, save_moe
        from .config import load_moe_config

        cfg = load_moe_config(args.recipe)
        built = build_from_config(cfg, device=pick_device(args.device))
        out = save_moe(built, args.out_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = built.router_stats
    extra = (f"; router calibration: top-1 routing accuracy {stats['accuracy_before']:.2f} -> "
             f"{stats['accuracy_after']:.2f} on {stats['tokens']} prompt tokens") if stats else ""
    print(f"wrote {len(cfg.experts)}-expert Mixtral ({cfg.gate_mode} gates{extra}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

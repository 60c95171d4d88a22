"""`python -m optimizer.merge RECIPE.yaml OUT_DIR`: apply a mergekit-style recipe with our kernels.

Exit code 0 on success, 2 with a one-paragraph message on bad input (see optimizer.merge.run_recipe).
"""

from __future__ import annotations

import argparse

from optimizer import UserError
from optimizer.cli import fail


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2e9' -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    t = text.strip().upper()
    try:
        for u, mult in units.items():
            if t.endswith(u):
                return int(float(t[: -len(u)]) * mult)
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB or 500MB") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m optimizer.merge",
                                 description="Apply a mergekit-style YAML recipe with merge-optimizer's kernels "
                                             "and write a loadable Hugging Face model folder.")
    ap.add_argument("recipe", help="mergekit-style YAML (models: or slices: form, frankenmerges included)")
    ap.add_argument("out_dir", help="output folder (config, safetensors shards, tokenizer, recipe.yaml)")
    ap.add_argument("--seed", type=int, help="seed of random masks (default: the recipe's merge_optimizer.seed "
                                             "or random_seed, else 0)")
    ap.add_argument("--trial", type=int, help="trial number of random masks (default: merge_optimizer.trial, "
                                              "else 0)")
    ap.add_argument("--device", help="auto | cpu | cuda | cuda:1 | mps (default: auto; for random masks the "
                                      "recipe's merge_optimizer.device when available)")
    ap.add_argument("--vocab-policy", choices=["error", "truncate_to_base"],
                    help="models whose vocabularies differ in size (default: the recipe's, else error)")
    ap.add_argument("--allow-pickle", action="store_true", help="accept .bin checkpoints (weights_only)")
    ap.add_argument("--precision", choices=["float32", "storage"],
                    help="arithmetic: float32 (default; the recipe's merge_optimizer.precision if set) or storage "
                         "(the storage dtype, op by op as mergekit: bf16 merges match mergekit's)")
    ap.add_argument("--kernels", choices=["eager", "fused"],
                    help="eager kernels, or the compiled one-pass ones (default: the recipe's merge_optimizer.kernels, "
                         "which a study writes when it merged with them, so the output is its trial bit for bit)")
    ap.add_argument("--max-shard-size", type=parse_size, default=5 * 10**9, help="output shard size (5GB)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = ap.parse_args(argv)

    from optimizer.merge.run_recipe import merge_recipe

    try:
        merge_recipe(args.recipe, args.out_dir, seed=args.seed, trial=args.trial, device=args.device,
                     vocab_policy=args.vocab_policy, allow_pickle=args.allow_pickle,
                     max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
                     precision=args.precision, kernels=args.kernels)
    except UserError as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m optimizer.routing MODEL_DIR --prompts NAME=FILE ... --out DIR`: routing report JSON + heatmap."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from optimizer import UserError
from optimizer.resources import resolve_path

from .build import RECIPE_FILE
from .routing import analyse

TEXT_FIELDS = ("text", "prompt+answer", "prompt", "question", "input")


def read_prompts(spec: str, field: str | None, limit: int) -> tuple[str, list[str]]:
    """Parse `NAME=FILE`: .txt has one prompt per line; .jsonl lines are strings or objects.

    Args:
        spec: "NAME=FILE"; FILE relative to the working directory, else to the installed package, whose
            `data/routing/{add,rev,kana}.jsonl` hold 40 prompts of each demo-zoo skill.
        field: for objects, the field to read; `a+b` concatenates fields (default: first of TEXT_FIELDS
            present, so the zoo's task rows give prompt+answer).
        limit: keep at most this many prompts (the first ones).
    """
    name, sep, file = spec.partition("=")
    if not sep or not name or not file:
        raise UserError(f"--prompts {spec!r}: expected NAME=FILE, e.g. --prompts add=data/routing/add.jsonl.")
    path = resolve_path(file)  # the working directory first, then the package (data/routing/*.jsonl ship)
    if not path.is_file():
        raise UserError(f"--prompts {name}: file {file!r} does not exist (the demo prompt sets are "
                        "data/routing/add.jsonl, rev.jsonl and kana.jsonl).")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix == ".jsonl":
        lines = [_text(json.loads(ln), field, name) for ln in lines]
    if not lines:
        raise UserError(f"--prompts {name}: {file!r} holds no prompts.")
    return name, lines[:limit]


def _text(row: Any, field: str | None, name: str) -> str:
    if isinstance(row, str):
        return row
    for candidate in [field] if field else TEXT_FIELDS:
        parts = candidate.split("+")
        if all(p in row for p in parts):
            return "".join(str(row[p]) for p in parts)
    raise UserError(f"--prompts {name}: a JSONL row has none of the fields {field or TEXT_FIELDS}; "
                    "pass --field NAME (or a+b to join fields).")


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Heatmaps: first-choice share per layer x (domain, expert), and top-1 repeat rate per layer x domain."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import numpy as np

    domains, experts = list(report["domains"]), report["experts"]
    per_domain = list(report["domains"].values())
    # rows: layers; columns: (domain, expert) pairs, domain-major
    share = np.array([[v for layers in per_domain for v in layers[i]["share"]]
                      for i in range(len(per_domain[0]))])
    repeat = np.array([[layers[i]["repeat_top1"] for layers in per_domain] for i in range(len(per_domain[0]))])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(3 + 0.6 * share.shape[1] + 0.8 * len(domains),
                                                   1.8 + 0.35 * share.shape[0]),
                                   gridspec_kw={"width_ratios": [share.shape[1], len(domains) + 1]})
    _heat(ax1, share, [f"{d}\n{e}" for d in domains for e in experts], "share of tokens (first choice)")
    ax1.set_xlabel("prompt set / expert", fontsize=8)
    chance = report["chance"]["repeat_top1"]
    _heat(ax2, repeat, domains, f"consecutive tokens, same expert\n(uniform chance {chance:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _heat(ax: Any, values: Any, xlabels: list[str], title: str) -> None:
    im = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels, fontsize=7)
    ax.set_yticks(range(values.shape[0]), [f"layer {i}" for i in range(values.shape[0])], fontsize=7)
    ax.set_title(title, fontsize=9)
    if values.size <= 400:  # numbers stay legible up to about this many cells
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                v = float(values[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.5 else "black")
    ax.figure.colorbar(im, ax=ax, fraction=0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimizer.routing", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a saved Mixtral folder (e.g. from python -m optimizer.moe)")
    parser.add_argument("--prompts", action="append", required=True, metavar="NAME=FILE",
                        help="a domain's prompts: .txt (one per line) or .jsonl; repeat per domain")
    parser.add_argument("--field", default=None, help="JSONL field to read (a+b joins fields)")
    parser.add_argument("--limit", type=int, default=200, help="prompts per domain (default 200)")
    parser.add_argument("--out", default=None, help="output folder (default MODEL_DIR/routing)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        sets = dict(read_prompts(s, args.field, args.limit) for s in args.prompts)
        model, tok, names = _load(args.model_dir, args.device)
        report = analyse(model, tok, sets, names)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.model_dir) / "routing")
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out / "routing.png")
    print(f"wrote {out / 'routing.json'} and {out / 'routing.png'}")
    return 0


def _load(model_dir: str, device: str) -> tuple[Any, Any, list[str] | None]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from optimizer.models import pick_device

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"{model_dir!r} is not a model folder (no config.json).")
    if AutoConfig.from_pretrained(path).model_type != "mixtral":
        raise UserError(f"{model_dir!r} is not a Mixtral model; routing analysis needs an MoE.")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(pick_device(device)).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    names = None
    if (path / RECIPE_FILE).is_file():
        names = [e["name"] for e in yaml.safe_load((path / RECIPE_FILE).read_text())["experts"]]
    return model, tok, names

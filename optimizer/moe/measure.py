"""`python -m optimizer.moe.measure [optimizer/conf/moe/demo.yaml]`: the issue-4 table on the demo zoo.

Rows: base, each expert (dense), and the MoE with oracle routing (each task's tokens forced to its own
expert: the ceiling), gate init only, gate init + calibration, and shared=merge + calibration. Columns: the
held-out accuracy per skill, the ratio to that skill's own expert, and the routing accuracy (first-choice
share of the right expert, averaged over layers) on the held-out prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from .assemble import write_shared
from .build import build_from_config, mean_shared
from .calibrate import calibrate_router, derive_router
from .config import load_moe_config
from .router import forced_routing, init_gates
from .routing import analyse, routing_accuracy


def heldout_prompts(zoo: Path, skills: list[str], split: str, n: int = 60) -> dict[str, list[str]]:
    """prompt + answer of the first `n` items of each skill's split (what the model reads when scored)."""
    out = {}
    for skill in skills:
        rows = [json.loads(x) for x in (zoo / "data" / skill / f"{split}.jsonl").read_text().splitlines() if x]
        out[skill] = [r["prompt"] + r["answer"] for r in rows[:n]]
    return out


def dense_rows(cfg: Any, zoo: Path, split: str) -> dict[str, dict[str, float]]:
    """Scores of the recipe's base ("base") and of each expert (by expert name), as dense models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.checkpoint import locate
    from optimizer.zoo.evaluate import ZooScorer

    rows = {}
    for name, ref in [("base", cfg.base_model), *((e.name, e.source_model) for e in cfg.experts)]:
        path = locate(ref)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        rows[name] = ZooScorer(model, AutoTokenizer.from_pretrained(path), zoo).score(split)
    return rows


def moe_rows(cfg: Any, zoo: Path, split: str) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Score the MoE variants on one live model (router and shared tensors rewritten in place)."""
    from optimizer.zoo.evaluate import ZooScorer

    skills = cfg.expert_names
    built = build_from_config(dataclasses.replace(cfg, calibrate=dataclasses.replace(cfg.calibrate, steps=0)))
    model, tok = built.model, built.tokenizer
    scorer = ZooScorer(model, tok, zoo)
    prompts = heldout_prompts(zoo, skills, split)
    own = {s: s for s in skills}
    rows, info = {}, {}
    oracle = {}
    for e, skill in enumerate(skills):
        with forced_routing(model, e):
            oracle[skill] = scorer.score(split)[skill]
    rows["MoE, oracle routing (ceiling)"] = oracle

    def measure(label: str) -> None:
        rows[label] = scorer.score(split)
        info[label] = routing_accuracy(analyse(model, tok, prompts, skills), own)

    measure(f"MoE, {cfg.gate_mode} gates, no calibration")
    calib = [e.calib_prompts() for e in cfg.experts]
    c = dataclasses.replace(cfg.calibrate, steps=cfg.calibrate.steps or 100)
    for rounds in sorted({0, c.rounds}):
        init_gates(model, tok, cfg)
        t0 = time.perf_counter()
        stats = calibrate_router(model, tok, calib, steps=c.steps, lr=c.lr, rounds=rounds, seed=cfg.seed)
        label = f"MoE, {cfg.gate_mode} gates + calibration ({rounds} on-policy rounds)"
        info[f"calibration, {rounds} rounds"] = {**stats, "seconds": round(time.perf_counter() - t0, 2)}
        measure(label)
    write_shared(model, mean_shared(built.sources))
    derive_router(model, tok, dataclasses.replace(cfg, shared="merge", calibrate=c))
    measure("MoE, shared=merge (mean) + calibration")
    return rows, info


def table(rows: dict[str, dict[str, float]], info: dict[str, Any], skills: list[str]) -> str:
    head = "| model | " + " | ".join(skills) + " | mean | min ratio to own expert | routing acc |"
    lines = [head, "|" + "---|" * (len(skills) + 4)]
    own = {s: rows[s][s] for s in skills}
    for label, scores in rows.items():
        ratio = min(scores[s] / own[s] for s in skills if own[s] > 0)
        route = info.get(label)
        route_txt = " / ".join(f"{route[s]:.2f}" for s in skills) if route else ""
        cells = " | ".join(f"{scores[s]:.3f}" for s in skills)
        lines.append(f"| {label} | {cells} | {sum(scores[s] for s in skills) / len(skills):.3f} | "
                     f"{ratio:.2f} | {route_txt} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimizer.moe.measure", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="optimizer/conf/moe/demo.yaml")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--out", default=None, help="also write the table (markdown) and details (JSON) here")
    args = parser.parse_args(argv)
    from optimizer.zoo import ensure_zoo

    zoo = ensure_zoo()
    cfg = load_moe_config(args.recipe)
    rows = dense_rows(cfg, zoo, args.split)
    moe, info = moe_rows(cfg, zoo, args.split)
    rows.update(moe)
    text = table(rows, info, cfg.expert_names)
    print(text)
    print(json.dumps({k: v for k, v in info.items() if k.startswith("calibration")}))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(text + "\n")
        (out / "table.json").write_text(json.dumps({"rows": rows, "info": info}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does the zoo merge? Uniform task arithmetic of the three experts vs the best single expert.

The optimizer's whole demo rests on this: a merge must beat every expert on the 3-skill mean, or there is
nothing to search for.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .evaluate import ZooScorer
from .layout import EXPERTS

WEIGHTS = (0.5, 0.7, 1.0)
Table = dict[str, dict[str, dict[str, float]]]  # row -> split -> skill -> acc


def task_arithmetic(base: Mapping[str, torch.Tensor], experts: list[Mapping[str, torch.Tensor]],
                    weight: float) -> dict[str, torch.Tensor]:
    """theta = base + sum_i weight * (theta_i - base), tensor by tensor.

    Args:
        base: base state dict.
        experts: expert state dicts (same keys and shapes).
        weight: the same coefficient for every expert.
    """
    return {k: v + weight * sum(e[k] - v for e in experts) for k, v in base.items()}


def score_state_dicts(states: Mapping[str, Mapping[str, torch.Tensor]], template, tok, zoo: Path,
                      splits: tuple[str, ...] = ("search", "heldout"),
                      on_row: Callable[[int], None] | None = None) -> Table:
    """Score each state dict on the zoo tasks, reusing one live model and one lm-eval wrapper.

    Args:
        states: row name -> state dict.
        template: a model of the zoo architecture (copied, not modified).
        tok: zoo tokenizer.
        zoo: zoo folder with `data/`.
        splits: splits to score.
        on_row: called with the row index after each row (progress display).
    """
    live = copy.deepcopy(template).eval()
    scorer = ZooScorer(live, tok, zoo)
    table: Table = {}
    for i, (name, state) in enumerate(states.items()):
        live.load_state_dict(state)
        table[name] = {split: scorer.score(split) for split in splits}
        if on_row:
            on_row(i)
    return table


def merge_rows(base, experts: Mapping, weights=WEIGHTS) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of the uniform task-arithmetic merges, one row per weight ("ta w=0.5", ...)."""
    base_sd = base.state_dict()
    expert_sds = [experts[e].state_dict() for e in EXPERTS]
    return {f"ta w={w}": task_arithmetic(base_sd, expert_sds, w) for w in weights}


def mergeability(zoo: Path, weights=WEIGHTS) -> Table:
    """Scores of base, experts and uniform merges of the zoo at `zoo` (both splits).

    Args:
        zoo: built zoo folder.
        weights: task-arithmetic weights to try.
    """
    from transformers import AutoTokenizer, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(zoo / "base")
    models = {name: MistralForCausalLM.from_pretrained(zoo / name) for name in ("base", *EXPERTS)}
    states = {name: m.state_dict() for name, m in models.items()}
    states.update(merge_rows(models["base"], models, weights))
    return score_state_dicts(states, models["base"], tok, zoo)


def mean(scores: Mapping[str, float]) -> float:
    """Unweighted mean over the skills."""
    return sum(scores[s] for s in EXPERTS) / len(EXPERTS)


def margin(table: Table, split: str = "heldout") -> float:
    """Best uniform merge's 3-skill mean minus the best single expert's (positive = the zoo merges)."""
    best_expert = max(mean(table[e][split]) for e in EXPERTS if e in table)
    best_merge = max(mean(row[split]) for name, row in table.items() if name.startswith("ta "))
    return best_merge - best_expert

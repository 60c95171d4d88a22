"""Coarse-to-fine: search a few shared values first, each written to every parameter of its group.

A coarse stage draws one value per group (per model; or per model and kind of unit) and writes it to all
the study's parameters in the group, so its trials are ordinary trials of the study's own space: they are
scored, exported and learned from like any other, and the finer stage that follows starts from the best of
them. `ProjectedSampler` does this as an Optuna sampler: it projects every finished trial that is constant
on the groups (the baselines, earlier coarse trials) into the small space, asks an inner sampler there
(rebuilt from those trials on every draw, so a resumed study continues exactly), and expands the answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from optimizer import UserError
from optimizer.space import SearchSpace

COARSE = ("model", "kind")

# Kind of a unit, by the first pattern its name matches (units are layer.N, block.N, anchor.N, leaf names
# such as self_attn.q_proj, or whole tensor names); anything else is `layers`.
_KINDS = (
    ("embed", re.compile(r"embed_tokens|wte|word_embeddings|embed_in")),
    ("head", re.compile(r"lm_head|embed_out")),
    ("norm", re.compile(r"norm|ln_")),
    ("attn", re.compile(r"attn|attention|[qkvo]_proj")),
    ("mlp", re.compile(r"mlp|gate_proj|up_proj|down_proj|fc\d|experts")),
)


def unit_kind(unit: str) -> str:
    """`embed`, `head`, `norm`, `attn`, `mlp` or `layers` (whole decoder layers, blocks, gradient anchors)."""
    for kind, pattern in _KINDS:
        if pattern.search(unit):
            return kind
    return "layers"


@dataclass(frozen=True)
class Group:
    """One coarse value: its name in the coarse space and the study parameters that take it."""

    name: str
    members: tuple[str, ...]
    distribution: FloatDistribution


def coarse_groups(space: SearchSpace, coarse: str) -> list[Group]:
    """Groups of the space's parameters for a coarse stage (`model` or `kind`), in parameter order."""
    if coarse not in COARSE:
        raise UserError(f"search.stages[].coarse={coarse!r} is unknown; use one of {list(COARSE)} or null "
                        "(the study's own units).")
    groups: dict[str, list[Any]] = {}
    for p in space.params:
        owner = f"{p.param}/{p.model}" if p.model else p.param
        key = f"{owner}/*" if coarse == "model" else f"{owner}/{unit_kind(space.layout.units[p.unit])}"
        groups.setdefault(key, []).append(p)
    return [Group(k, tuple(p.name for p in ps), FloatDistribution(ps[0].low, ps[0].high, log=ps[0].log))
            for k, ps in groups.items()]


def project(groups: Sequence[Group], params: Mapping[str, float], tol: float = 1e-9) -> dict[str, float] | None:
    """The coarse values of a full parameter set, or None when a group's members differ (not coarse)."""
    out = {}
    for g in groups:
        values = [params.get(m) for m in g.members]
        if any(v is None for v in values) or max(values) - min(values) > tol:
            return None
        out[g.name] = float(values[0])
    return out


def expand(groups: Sequence[Group], coarse: Mapping[str, float]) -> dict[str, float]:
    return {m: float(coarse[g.name]) for g in groups for m in g.members}


class ProjectedSampler(optuna.samplers.BaseSampler):
    """Draws coarse values with an inner sampler and writes them to every parameter of their group.

    Args:
        space: the study's space (every trial suggests all of its parameters).
        groups: the coarse groups (`coarse_groups`).
        inner: factory(seed) of the sampler used in the coarse space; it must learn from finished trials
            alone (GP, TPE, random, QMC), as it is rebuilt from them on every draw.
        seed: base seed; draw `n` uses `seed + n`.
    """

    def __init__(self, space: SearchSpace, groups: Sequence[Group],
                 inner: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self.space = space
        self.groups = list(groups)
        self.inner = inner
        self.seed = seed
        self._fallback = optuna.samplers.RandomSampler(seed=seed)
        self._dists = {g.name: g.distribution for g in self.groups}

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.space.distributions()

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        inner = optuna.create_study(direction=study.direction, sampler=self.inner(self.seed + trial.number))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            z = project(self.groups, t.params)
            if z is not None:
                inner.add_trial(optuna.trial.create_trial(params=z, distributions=self._dists, value=t.value))
        return expand(self.groups, inner.ask(self._dists).params)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

"""Dataclass schemas of the run configuration, registered in Hydra's ConfigStore.

Values live in `optimizer/conf/**.yaml`; these classes give them types, so a typo'd key or a wrong type fails at
composition, before any model is loaded. Plug-in specific nodes (evaluator, judge, moe) are typed by their
plug-ins and validated when the plug-in is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from optimizer import UserError

_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_study_name(name: Any) -> str:
    """`study_name` names a folder under run_root: a plain name (letters, digits, `.`, `_`, `-`)."""
    if not isinstance(name, str) or not _STUDY_NAME.match(name) or ".." in name:
        raise UserError(f"study_name={name!r} is not a plain name: use letters, digits, '.', '_' and '-' "
                        "(no '/', no '..', at most 128 characters, starting with a letter or digit); it names "
                        "the folder run_root/study_name.")
    return name


@dataclass
class ModelsConfig:
    """Which models are merged.

    Args:
        base: the common ancestor the task vectors are taken against (path, hub id or `zoo://name`).
        models: name -> reference of each fine-tune; the name appears in parameter names and recipes.
        target: what the task vectors are added to (chat-vector style); defaults to `base`.
        tokenizer: where the tokenizer comes from; defaults to `target` or `base`.
        dtype: dtype of the resident tensors and the live model (`auto` = as stored).
        allow_pickle: accept `.bin` checkpoints (loaded with weights_only=True).
        vocab_policy: models whose embeddings / lm_head differ in vocabulary size: `error` (default), or
            `truncate_to_base` (task vectors cover the rows a model shares with the base; the result keeps the
            vocabulary of the model it is built on, target else base).
    """

    base: str = "zoo://base"
    models: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    vocab_policy: str = "error"


@dataclass
class MergeConfig:
    """The merge method and which of its declared parameters are searched.

    Args:
        method: a name registered in `optimizer.merge.registry.METHODS`.
        search: parameters searched (default: every searchable parameter the method declares).
        params: pinned values of parameters that are not searched (scalars, or {model: value}).
        bounds: search bounds per parameter, [low, high] (default: the method's declared bounds).
        log: log-scale sampling per parameter.
        baselines: trials enqueued first, each {param: value} applied to every unit and model.
    """

    method: str = "task_arithmetic"
    search: list[str] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    bounds: dict[str, list[float]] = field(default_factory=dict)
    log: dict[str, bool] = field(default_factory=dict)
    baselines: list[dict[str, float]] = field(default_factory=list)


@dataclass
class ModeConfig:
    """Search granularity: `all`, `layer`, `parameter`, `block:K` or `gradient:K`."""

    granularity: str = "layer"
    split_attn_mlp: bool = False


@dataclass
class SamplerConfig:
    """Optuna sampler by name (`tpe`, `cmaes`, `random`, `gp`, `nsga2`, `qmc`) with keyword arguments."""

    name: str = "tpe"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageConfig:
    """One stage of the search schedule (`search.stages`); stages run in order inside one study.

    Args:
        name: recorded on each of its trials (user attr `stage`) and on the study.
        kind: `sample` (trials drawn by a sampler) or `refine` (one trial: gradient refinement of the best
            finished trial, see `search.refine`).
        coarse: sample stages: search fewer values first, one per group of units and model: `model` (one
            value per model), `kind` (per model and kind of unit: embeddings, layers/attention/MLP, norms,
            head); null: the study's own units (`mode`).
        trials: sample stages: a share (< 1) or a number (>= 1) of the trials after the baselines; the last
            sample stage takes the rest. Refine stages take one trial.
        sampler: coarse stages: the sampler of the few coarse values (default `gp`); fine stages: null
            (the `sampler` group) or another registered name.
        sigma0: CMA-ES step of this stage, as a fraction of each parameter's range (null: sampler.kwargs).
        kwargs: keyword arguments of this stage's sampler (fine stages: laid over sampler.kwargs).
    """

    name: str = "???"
    kind: str = "sample"
    coarse: str | None = None
    trials: float = 0.0
    sampler: str | None = None
    sigma0: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RefineConfig:
    """Gradient refinement of merge weights on the search split's gold answers (`kind: refine` stages).

    Args:
        steps, lr: Adam steps and learning rate (in weight units).
        batch_items: items per step (0: every search item each step).
        loss: `ce` (cross-entropy of the gold answers), `prob` (minus their probability, as the `prob` search
            metric), `soft_acc` (minus sigmoid(margin / temperature): a differentiable accuracy) or `entropy`
            (of the predictions over the choices; needs no gold).
        temperature: of `soft_acc`, in log-probability units.
        limit: at most this many search items per task are used (null: all).
        micro_items: items per forward/backward pass (0: a step's whole batch at once); gradients are
            accumulated, so the step is the same and only one micro-batch's activations are held.
    """

    steps: int = 30
    lr: float = 0.05
    batch_items: int = 90
    micro_items: int = 30
    loss: str = "ce"
    temperature: float = 1.0
    limit: int | None = None


@dataclass
class SearchConfig:
    """How the trial budget is spent, after the baselines.

    Args:
        warm_start: samplers with a start point (CMA-ES) begin at the best finished trial (after the
            baselines: the best baseline) instead of the centre of the box.
        stages: the schedule (see StageConfig); empty = one sample stage with the `sampler` group.
        refine: settings of refine stages.
    """

    warm_start: bool = True
    stages: list[StageConfig] = field(default_factory=list)
    refine: RefineConfig = field(default_factory=RefineConfig)


@dataclass
class StorageConfig:
    """Where the study lives: `sqlite` (runs/<study>/study.db), `journal`, `postgresql`, `memory`.

    Args:
        url: the storage URL (SQLite file, journal path, PostgreSQL server). For a server, prefer the
            environment variable `url_env` names: a password in `url` is redacted in everything written,
            but it still passes through the command line.
        url_env: environment variable holding the PostgreSQL URL (read when `url` is unset).
        heartbeat_interval: seconds between a running trial's heartbeats (Optuna's for SQLite/PostgreSQL, a
            user attr for the journal).
        grace_period: seconds without a heartbeat after which a trial's worker counts as dead and the trial
            is failed and re-enqueued (null: 3 heartbeat intervals). A worker on the same host that no
            longer exists is found at once, without waiting.
        max_retry: how many times one trial's parameters are re-enqueued after its worker died.
    """

    kind: str = "sqlite"
    url: str | None = None
    url_env: str = "OPTUNA_STORAGE_URL"
    heartbeat_interval: int = 20
    grace_period: int | None = None
    max_retry: int = 3


@dataclass
class PrunerConfig:
    """Optuna pruner by name (`none`, `wilcoxon`, `median`); `wilcoxon` needs per-item reporting."""

    name: str = "none"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportConfig:
    """What is written after the study: the best model, its recipe and scores."""

    enabled: bool = True
    heldout: bool = True
    heldout_top_k: int = 5  # re-evaluate the top-k on held-out; export the best held-out among them
    references: bool = True
    repeats: int = 1  # >1: evaluate the exported trial this many times with fresh seeds (mean +- sd)


@dataclass
class Config:
    """The root of a run. `n_trials` is the number of finished trials the study should reach."""

    study_name: str = "demo"
    n_trials: int = 30
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch CPU threads; None: auto (1 for models under 50M params on CPU)
    # compiled one-pass merge kernels (optimizer/merge/fused.py): auto (on for models of >= 50M params when
    # torch.compile can build for the device), on, off
    fused_kernels: str = "auto"
    run_root: str = "runs"
    max_failures: int = 5
    models: ModelsConfig = field(default_factory=ModelsConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    evaluator: Any = None
    judge: Any = None
    moe: Any = None
    objective: Any = None
    trial: int | None = None  # `python -m optimizer.export`: which trial to export (default: the best)


def register_configs() -> None:
    """Register the root schema so `conf/config.yaml` can use `base_config` as its first default.

    Only the root is registered: `Config` types every group node (`merge: MergeConfig`, ...), so a group
    option's YAML is checked against its dataclass when it is merged in (a typo'd key fails at composition).
    Registering per-group schema nodes as well (`merge/base_merge`, ...) would make them group options:
    `--help` would list them and `merge=base_merge` would run.
    """
    ConfigStore.instance().store(name="base_config", node=Config)

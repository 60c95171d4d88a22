"""The run state below the study loop: validate a configuration, load the models once, score a plan.

Everything that touches the live model goes through `score()`: the search objective, the held-out
re-evaluation, the Pareto export and the noise repeats. The runner (study loop) and the export package
both build on this module; it imports neither, so there is no import cycle.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from rich.console import Console

from optimizer import UserError
from optimizer.config import check_study_name
from optimizer.eval import SEARCH, Evaluator, Scores, build_evaluator
from optimizer.merge.registry import METHODS
from optimizer.models import ModelSet, Resident, pick_device
from optimizer.objective import Objective
from optimizer.plan import MergePlan
from optimizer.space import SearchSpace, derive_layout
from optimizer.study import build_pruner, check_sampler

if TYPE_CHECKING:
    from optimizer.merge.apply import Applier, PlanApplier
    from optimizer.moe.config import MoeConfig

console = Console(highlight=False, soft_wrap=True)


@dataclass
class Session:
    """Everything a run builds, in the order it is built (validation first, loading last).

    Args:
        cfg: the composed run configuration.
        run_dir: `run_root/study_name`.
        device: where resident tensors, the live model and evaluation live.
        models: the validated model set (headers only until `load`).
        space: the search space derived from tensor names, granularity and the method's parameters.
        evaluator: the configured evaluator (validated).
        objective: how Scores become the trial value(s).
        moe: the MoE recipe when the live model is a frankenMoE.
        live, tokenizer, applier, resident: set by `load`.
        dense: (model, applier) of a dense model, for references when the live model is an MoE.
    """

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    models: ModelSet
    space: SearchSpace
    evaluator: Evaluator
    objective: Objective
    moe: MoeConfig | None = None
    live: torch.nn.Module | None = None
    tokenizer: Any = None
    applier: PlanApplier | None = None
    resident: Resident | None = None
    dense: tuple[torch.nn.Module, Applier] | None = None
    timings: dict[str, list[float]] = field(default_factory=lambda: {"merge": [], "eval": [], "pruned_at": []})
    kernels: str = ""  # which merge kernels run (set_fused's note)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.evaluator.splits())


def prepare(cfg: DictConfig) -> Session:
    """Check the whole configuration against the models' headers; nothing heavy is loaded, nothing written.

    Order: cheap config checks, the models (headers), the space, the evaluator, the disk. The storage and
    the stored study's identity are checked next, by the runner, still before anything is loaded."""
    check_study_name(cfg.study_name)
    if cfg.n_trials < 1:
        raise UserError(f"n_trials={cfg.n_trials}: the study needs at least one trial.")
    if cfg.merge.method not in METHODS:
        raise UserError(f"merge.method={cfg.merge.method!r} is unknown; choose one of {sorted(METHODS)}.")
    method = METHODS[cfg.merge.method]
    check_sampler(cfg.sampler)
    device = pick_device(cfg.device)
    moe = None
    if cfg.moe is not None:
        from optimizer.moe.config import load_moe_config

        moe = load_moe_config(cfg.moe)
        if cfg.models.target:
            raise UserError("moe= is set together with models.target; an MoE takes its shared tensors from "
                            "moe.base_model, so drop models.target.")
        # The MoE recipe names the models: its base and experts replace the `models` group.
        cfg.models.base = moe.base_model
        cfg.models.models = {e.name: e.source_model for e in moe.experts}
        if moe.dtype != "auto":
            cfg.models.dtype = moe.dtype
    models = ModelSet(cfg.models)
    set_threads(cfg.threads, device, models)
    fused_note = set_fused(cfg.fused_kernels, device, models)
    n = len(models.names)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        raise UserError(f"merge.method={method.name!r} takes {method.min_models}..{method.max_models or 'any'} "
                        f"models besides the base, got {n}: {list(models.names)}.")
    if cfg.models.target and not method.uses_base:
        raise UserError(f"models.target is set, but {method.name!r} is not a task-vector method; "
                        "drop models.target or use task_arithmetic/ties/dare_*.")
    names = models.tensor_names
    if moe is not None:
        from optimizer.moe.search import live_tensor_names

        names = live_tensor_names(moe, names)  # tensors that never reach the MoE's output are not searched
    space = SearchSpace(method, models.names, derive_layout(names, cfg.mode.granularity), cfg.merge)
    run_dir = Path(cfg.run_root) / cfg.study_name
    context = {"device": device, "run_dir": run_dir, "seed": cfg.seed, "cfg": cfg}
    check_split_overlap(cfg.evaluator)
    evaluator = build_evaluator(cfg.evaluator, context)
    evaluator.validate()
    objective = Objective.from_config(cfg.objective, evaluator)
    build_pruner(cfg.pruner)
    if cfg.pruner.name != "none":
        if objective.multi:
            raise UserError(f"pruner={cfg.pruner.name} works on single-objective studies only; use pruner=none "
                            "with several objectives.")
        if evaluator.chunk_size <= 0:
            raise UserError(f"pruner={cfg.pruner.name} needs per-item reports: set evaluator.chunk_size "
                            "(e.g. 25) so items are scored and reported in chunks.")
    for b in cfg.merge.baselines:
        space.baseline(b)
    check_disk(Path(cfg.run_root), export_bytes(models) if cfg.export.enabled else 0)
    return Session(cfg, run_dir, device, models, space, evaluator, objective, moe=moe, kernels=fused_note)


def check_split_overlap(node: Any, where: str = "evaluator") -> None:
    """A task searched and held out on the same split has no held-out score: the held-out choice would
    re-rank trials by the numbers they were searched on. Checked in every evaluator node (composite parts)."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if isinstance(data, dict):
        for i, t in enumerate(data.get("tasks") or []):
            if isinstance(t, dict) and t.get("search_split") and t.get("search_split") == t.get("heldout_split"):
                raise UserError(f"{where}.tasks[{i}] ({t.get('name')!r}): search_split and heldout_split are both "
                                f"{t['search_split']!r}; held-out scores must come from items the search never saw. "
                                "Use another heldout_split (or null for no held-out re-evaluation).")
        for k, v in data.items():
            if k != "tasks" and isinstance(v, dict):
                check_split_overlap(v, f"{where}.{k}")


def export_bytes(models: ModelSet) -> int:
    """Roughly what one exported model folder takes (weights in the run's dtype)."""
    size = torch.empty((), dtype=models.dtype).element_size()
    return sum(math.prod(i.shape) for n, i in models.infos.items() if i.dtype.is_floating_point) * size


# Beside an export: the study database, per-trial artifacts, Hydra's copies, a journal.
_DISK_MARGIN = 32 * 2**20


def check_disk(run_root: Path, need: int) -> None:
    """run_root must be writable and hold an export (the new folder is written before the old one goes)."""
    import errno
    import shutil
    import tempfile

    probe = run_root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"run_root={str(run_root)!r}: {str(probe)!r} is a file, not a folder.")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".merge-optimizer-probe-"):
            pass
    except OSError as e:
        why = "read-only file system" if e.errno == errno.EROFS else (e.strerror or str(e))
        raise UserError(f"run_root={str(run_root)!r} is not writable ({why} at {str(probe)!r}); point run_root "
                        "at a writable folder (the study, its artifacts and the best model are written there).") from None
    free = shutil.disk_usage(probe).free
    if free < need + _DISK_MARGIN:
        raise UserError(f"run_root={str(run_root)!r} has {free / 2**20:.0f} MiB free, but the run needs about "
                        f"{(need + _DISK_MARGIN) / 2**20:.0f} MiB (one exported model of {need / 2**20:.0f} MiB plus "
                        "the study and its artifacts); free some space or point run_root elsewhere.")


# Below this a model is small: thread hand-offs cost more than its math, and a merge costs milliseconds
# (compiling the fused kernels would not pay).
SMALL_MODEL_PARAMS = 50_000_000


def set_threads(threads: int | None, device: torch.device, models: ModelSet) -> None:
    """CPU threads for torch. Auto (None): one thread for small models on CPU, where thread hand-offs
    cost more than the math (the demo zoo evaluates ~5x faster on 1 thread than on 2)."""
    if threads:
        torch.set_num_threads(int(threads))
    elif device.type == "cpu" and models.n_params < SMALL_MODEL_PARAMS:
        torch.set_num_threads(1)


def set_fused(choice: Any, device: torch.device, models: ModelSet) -> str:
    """Switch the compiled merge kernels on or off for this process; returns what the console says.

    ``auto``: on when the model has >= SMALL_MODEL_PARAMS parameters and torch.compile can build for the
    device (compiling costs seconds to a minute once, at the warm-up merge; a merge of a small model costs
    milliseconds). ``on`` without a compiler is a UserError, before anything is loaded."""
    from optimizer.merge import fused

    value = str(choice).strip().lower()
    mode = {"auto": "auto", "on": "on", "true": "on", "1": "on", "off": "off", "false": "off", "0": "off"}.get(value)
    if mode is None:
        raise UserError(f"fused_kernels={choice!r} is not a choice; use auto, on or off.")
    why_not = fused.available(device) if mode != "off" else "fused_kernels=off"
    if mode == "on" and why_not:
        raise UserError(f"fused_kernels=on, but the compiled merge kernels cannot run on {device}: {why_not}. "
                        "Install what is missing, or use fused_kernels=auto or off (the eager kernels give "
                        "the same merges, slower).")
    params = models.n_params
    if mode == "auto" and not why_not and params < SMALL_MODEL_PARAMS:
        why_not = f"{params / 1e6:.0f}M parameters < {SMALL_MODEL_PARAMS / 1e6:.0f}M"
    fused.enable(not why_not)
    return "fused merge kernels on" if not why_not else f"eager merge kernels ({why_not})"


def load(s: Session) -> None:
    """Load the resident tensors and the live model once (the expensive part)."""
    from rich.progress import Progress

    from optimizer.merge.apply import Applier

    names = s.models.tensor_names
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"loading {len(s.models.names)} task vectors to {s.device}", total=len(names))
        resident = s.models.load_resident(s.device, progress=lambda _: bar.advance(task))
    s.tokenizer = s.models.load_tokenizer()
    if s.moe is None:
        s.live = s.models.load_live(s.device)
        s.applier = Applier(s.live, resident)
    else:
        from transformers import AutoConfig

        from optimizer.moe.search import MoeApplier, build_live_moe

        base_config = AutoConfig.from_pretrained(str(s.models.base.path))
        s.live = build_live_moe(s.moe, base_config, resident.anchor, resident.deltas, s.tokenizer,
                                dtype=s.models.dtype, device=s.device)
        s.applier = MoeApplier(s.live, resident, s.moe, s.tokenizer)
    s.resident = resident
    from optimizer.models import warm_up  # trial 0's one-off costs (order statistics, page faults) go here

    first = list(s.cfg.merge.baselines)[:1] or [{}]
    compiling = ", compiling the fused kernels" if s.kernels.startswith("fused") else ""
    warm = warm_up(s.applier, s.space.plan(s.space.baseline(first[0])), seed=s.cfg.seed, console=console,
                   label=f"warm-up: one {s.space.method.name} merge (order statistics, page faults{compiling})")
    console.print(f"resident: {resident.nbytes() / 2**20:.1f} MiB on {s.device}; "
                  f"search space: {len(s.space)} parameters ({s.space.layout.granularity}, "
                  f"{len(s.space.layout.units)} units x {len(s.models.names)} models); {s.kernels}; "
                  f"warm-up {warm:.2f} s")


def dense_reference(s: Session) -> tuple[torch.nn.Module, Applier]:
    """(model, applier) that can write the base or one expert alone: the live model, or for an MoE a dense
    model loaded on first use (references compare the MoE with the dense experts it was built from)."""
    if s.moe is None:
        return s.live, s.applier
    if s.dense is None:
        from optimizer.merge.apply import Applier

        model = s.models.load_live(s.device)
        s.dense = (model, Applier(model, s.resident))
    return s.dense


def score(s: Session, plan: MergePlan, split: str = SEARCH, *, trial: int = 0, seed: int | None = None,
          on_item: Callable[[str, int, float], None] | None = None) -> Scores:
    """Materialise `plan` in the live model and score it on `split`.

    Args:
        s: the loaded session.
        plan: the merge to write (in place).
        split: "search" or "heldout".
        trial: trial number (seeds the random masks of DARE/DELLA together with `seed`).
        seed: the study seed by default; noise repeats pass fresh ones.
        on_item: per-item callback for pruning (see `Evaluator.evaluate`).

    Returns the evaluator's Scores with `merge_seconds` and `eval_seconds` in `info`.
    """
    t0 = time.perf_counter()
    s.applier.apply(plan, seed=s.cfg.seed if seed is None else seed, trial=trial)
    t1 = time.perf_counter()
    scores = s.evaluator.evaluate(s.live, s.tokenizer, split, on_item=on_item)
    t2 = time.perf_counter()
    scores.info.setdefault("merge_seconds", t1 - t0)
    scores.info["eval_seconds"] = t2 - t1
    return scores


def score_single(s: Session, index: int | None, split: str) -> Scores:
    """The anchor (`index=None`) or model `index` alone, scored on `split` (dense model for an MoE)."""
    model, applier = dense_reference(s)
    applier.apply_single(index)
    return s.evaluator.evaluate(model, s.tokenizer, split)

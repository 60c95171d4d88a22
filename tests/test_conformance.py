"""Every sampler, pruner and storage kind the registries offer runs a short study through the real runner.

Parametrized over the registries themselves (`optimizer.study.SAMPLERS`, `PRUNERS`) and over the storage
options users can select (`optimizer/conf/storage/*.yaml`), so a new entry is covered the day it is added.
The toy evaluator (tests/conftest.py) scores closeness to a hidden per-layer optimum, so trials are cheap
and their values differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pytest
import torch
from omegaconf import OmegaConf
from optuna.trial import TrialState

from optimizer.config import Config, PrunerConfig, SamplerConfig, StorageConfig
from optimizer.pruning import ITEMS
from optimizer.resources import CONF_DIR
from optimizer.runner import run
from optimizer.study import PRUNERS, SAMPLERS, build_pruner, build_sampler, build_storage

from .postgres_server import postgres  # noqa: F401  (fixture: skips, saying why, without a server)

BASELINES = [{"weight": 1.0}, {"weight": 0.5}]
BOUNDS = (0.0, 1.5)
N_TRIALS = 5  # two baselines, then three draws of the sampler
STORAGE_KINDS = sorted(OmegaConf.load(p).kind for p in (CONF_DIR / "storage").glob("*.yaml"))


def make_cfg(tiny_models, tmp_path, **kw):
    cfg = OmegaConf.structured(Config)
    cfg.models.base = str(tiny_models["base"])
    cfg.models.models = {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])}
    cfg.evaluator = {"name": "toy", "paths": {k: str(tiny_models[k]) for k in ("base", "a", "b")}}
    cfg.merge.baselines = BASELINES
    cfg.merge.bounds = {"weight": list(BOUNDS)}
    cfg.run_root = str(tmp_path / "runs")
    cfg.study_name = "c"
    cfg.device = "cpu"
    cfg.export.enabled = False
    return OmegaConf.merge(cfg, kw)


SCHEMAS = {"sampler": SamplerConfig, "pruner": PrunerConfig, "storage": StorageConfig}


def conf_node(group: str, name: str):
    """The shipped config of `group=name` on its schema (what `python -m optimizer group=name` composes)."""
    node = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
    node.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(SCHEMAS[group]), node)


def load(cfg) -> optuna.Study:
    return optuna.load_study(study_name=cfg.study_name, storage=build_storage(cfg.storage, _run_dir(cfg)))


def _run_dir(cfg) -> Path:
    return Path(cfg.run_root) / cfg.study_name


# -- samplers ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler_runs(tiny_models, tmp_path_factory):
    """name -> (trials of study 1, trials of study 2 with the same seed, trials with another seed)."""
    out = {}
    for name in sorted(SAMPLERS):
        tmp = tmp_path_factory.mktemp(f"sampler-{name}")
        studies = []
        for study_name, seed in (("first", 0), ("again", 0), ("other_seed", 1)):
            cfg = make_cfg(tiny_models, tmp, sampler=conf_node("sampler", name), n_trials=N_TRIALS,
                           study_name=study_name, seed=seed)
            assert run(cfg) == 0
            studies.append(load(cfg).trials)
        out[name] = tuple(studies)
    return out


def test_every_sampler_has_a_config():
    for name in SAMPLERS:
        assert conf_node("sampler", name).name == name
        assert isinstance(build_sampler(conf_node("sampler", name), 0), optuna.samplers.BaseSampler)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_runs_a_short_study(sampler_runs, name):
    trials, again, other = sampler_runs[name]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * N_TRIALS
    assert [t.user_attrs.get("baseline") for t in trials[:2]] == ["weight=1.0", "weight=0.5"]
    assert set(trials[0].params.values()) == {1.0} and set(trials[1].params.values()) == {0.5}
    drawn = trials[2:]
    for t in drawn:
        assert "baseline" not in t.user_attrs
        assert all(BOUNDS[0] <= v <= BOUNDS[1] for v in t.params.values())
        assert t.params not in (trials[0].params, trials[1].params)  # a draw, not a baseline again
        assert t.value == pytest.approx(t.user_attrs["scores"]["l0"] / 2 + t.user_attrs["scores"]["l1"] / 2)
    assert len({tuple(t.params.values()) for t in drawn}) == len(drawn)
    # the study seed drives the sampler: same seed, same draws; another seed, other draws (QMC without
    # `scramble` walks the same Sobol sequence whatever the seed: by design, see optuna.samplers.QMCSampler)
    assert [t.params for t in again] == [t.params for t in trials]
    seeded = not (name == "qmc" and not conf_node("sampler", name).kwargs.get("scramble"))
    assert ([t.params for t in other[2:]] != [t.params for t in drawn]) == seeded


# -- pruners ----------------------------------------------------------------------------------------------


def test_every_pruner_has_a_config():
    for name in PRUNERS:
        node = conf_node("pruner", name)
        assert node.name == name
        assert isinstance(build_pruner(node), optuna.pruners.BasePruner)


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_pruner_runs_a_short_study(tiny_models, tmp_path, name):
    items = 120  # the toy evaluator scores 60 items on each of its two tasks, reported in chunks of 10
    cfg = make_cfg(tiny_models, tmp_path, pruner=conf_node("pruner", name), n_trials=12,
                   sampler={"name": "random"}, evaluator={"chunk_size": 10})
    assert run(cfg) == 0
    trials = load(cfg).trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(pruned) + len(complete) == 12
    # Wilcoxon reads the per-item scores from the trial's `item_scores` user attr (whole for a finished
    # trial); the others get the running mean of the items at each check (step = items scored)
    per_item = name == "wilcoxon"
    for t in complete:
        assert sorted(t.intermediate_values) == ([] if name == "none" or per_item else list(range(10, items + 1, 10)))
        assert len(t.user_attrs.get(ITEMS, [])) == (items if per_item else 0)
    if name == "none":
        assert not pruned
        return
    assert pruned, f"pruner={name} pruned nothing in 12 trials"
    best = max(complete, key=lambda t: t.value)
    for t in pruned:
        n = t.user_attrs["pruned_after_items"]
        assert n % 10 == 0 and n < items
        assert sorted(t.intermediate_values) == ([] if per_item else list(range(10, n + 1, 10)))
        if per_item:
            assert len(t.user_attrs[ITEMS]) == n
            mine = sum(t.user_attrs[ITEMS]) / n
            theirs = sum(best.user_attrs[ITEMS][:n]) / n
        else:
            mine, theirs = t.intermediate_values[n], best.intermediate_values[n]
        assert mine < theirs  # only trials doing worse than the best on the same items are stopped


# -- storages ---------------------------------------------------------------------------------------------


def test_storage_kinds_are_known():
    assert set(STORAGE_KINDS) == {"sqlite", "journal", "postgresql", "memory"}


@pytest.fixture
def storage_node(request, tmp_path):
    kind = request.param
    node = conf_node("storage", kind)
    if kind == "postgresql":  # a throwaway server (tests/postgres_server.py), or the one $OPTUNA_STORAGE_URL names
        url = os.environ.get(node.url_env) or request.getfixturevalue("postgres")
        node.url = url  # a shared server: each test run uses a study name of its own
    return node


@pytest.mark.parametrize("storage_node", STORAGE_KINDS, indirect=True)
def test_storage_runs_resumes_and_exports(tiny_models, tmp_path, storage_node):
    kind = storage_node.kind
    name = f"c_{kind}_{os.getpid()}_{tmp_path.name}"[:60]
    cfg = make_cfg(tiny_models, tmp_path, storage=storage_node, n_trials=3, study_name=name,
                   sampler={"name": "random"}, export={"enabled": True, "heldout_top_k": 2})
    run_dir = tmp_path / "runs" / name
    assert run(cfg) == 0
    best = run_dir / "best" / "scores.json"
    first = json.loads(best.read_text())
    assert first["n_trials_seen"] == 3
    assert run(OmegaConf.merge(cfg, {"n_trials": 5})) == 0
    second = json.loads(best.read_text())
    assert (run_dir / "study.db").exists() == (kind == "sqlite")
    assert (run_dir / "journal.log").exists() == (kind == "journal")
    if kind == "memory":  # nothing persisted: the second run is a new study of 5 trials
        assert second["n_trials_seen"] == 5
        assert second["baselines"].keys() == first["baselines"].keys() == {"weight=1.0", "weight=0.5"}
        return
    trials = load(cfg).trials
    assert len(trials) == 5 and second["n_trials_seen"] == 5  # resumed: 2 more, not 5 more
    assert [t.user_attrs.get("baseline") for t in trials].count("weight=1.0") == 1
    assert second["best"]["trial"] in {t.number for t in trials}
    assert trials[3].params != trials[2].params  # the resumed run does not replay the first run's draws


# -- devices ----------------------------------------------------------------------------------------------


def _study_on(tiny_models, tmp_path, device: str, method: str):
    from safetensors.torch import load_file

    cfg = make_cfg(tiny_models, tmp_path / device, n_trials=4, device=device, sampler={"name": "random"},
                   merge={"method": method}, export={"enabled": True, "references": False, "heldout_top_k": 2})
    assert run(cfg) == 0
    best = json.loads((_run_dir(cfg) / "best" / "scores.json").read_text())["best"]["trial"]
    return load(cfg).trials, best, load_file(str(_run_dir(cfg) / "best" / "model.safetensors"))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_cuda_study_matches_cpu(tiny_models, tmp_path, method):
    """The same short study with device=cuda and device=cpu: same draws, same scores, same export."""
    cpu_trials, cpu_best, cpu_model = _study_on(tiny_models, tmp_path, "cpu", method)
    gpu_trials, gpu_best, gpu_model = _study_on(tiny_models, tmp_path, "cuda", method)
    assert [t.params for t in gpu_trials] == [t.params for t in cpu_trials]
    assert [t.value for t in gpu_trials] == pytest.approx([t.value for t in cpu_trials], abs=1e-6)
    assert gpu_best == cpu_best and gpu_model.keys() == cpu_model.keys()
    for name, t in cpu_model.items():
        assert gpu_model[name].device.type == "cpu"  # saved from the GPU, read back like any checkpoint
        torch.testing.assert_close(gpu_model[name], t, rtol=1e-5, atol=1e-6, msg=name)

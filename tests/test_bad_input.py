"""Every bad input of issue 10: exit code 2 with one paragraph naming the key, value or file, before any trial
and with nothing added to the study. A representative subset runs the real CLI (`python -m optimizer`,
`python -m optimizer.merge`) in a subprocess; the rest calls `run(cfg)` in-process (fast)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from optimizer import UserError
from optimizer.runner import run

from .test_runner import make_cfg

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "Sup3r-secret-pw"


def cli(*args: str, module: str = "optimizer") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def trials_in(run_root: Path, name: str = "t") -> int | None:
    db = run_root / name / "study.db"
    if not db.exists():
        return None
    try:
        return len(optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials)
    except KeyError:
        return None


def assert_exit_2(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr  # one paragraph
    for needle in needles:
        assert needle in errors[0], errors[0]


def tiny_cli_args(tiny_models, run_root: Path, **models) -> list[str]:
    return ["models=custom", f"models.base={tiny_models['base']}", f"run_root={run_root}", "study_name=t",
            *[f"+models.models.{k}={v}" for k, v in (models or {"a": tiny_models["a"]}).items()]]


# ---------------------------------------------------------------- the real CLI (subprocess)

def _truncated(tiny_models, tmp_path):
    bad = copy_model(tiny_models["a"], tmp_path / "trunc")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return tiny_cli_args(tiny_models, tmp_path / "runs", a=bad), ["models.models.a=", "model.safetensors",
                                                                  "truncated or corrupt"]


def _nan_bounds(tiny_models, tmp_path):
    return [*tiny_cli_args(tiny_models, tmp_path / "runs"), "merge.bounds.weight=[nan,1.0]"], [
        "merge.bounds.weight=[nan, 1.0]", "finite"]


def _sqlite_url_unopenable(tiny_models, tmp_path):
    return [*tiny_cli_args(tiny_models, tmp_path / "runs"), "storage.url=sqlite:////proc/no/such/dir/x.db"], [
        "cannot open the study storage 'sqlite:////proc/no/such/dir/x.db'", "storage=sqlite"]


def _device(tiny_models, tmp_path):
    return [*tiny_cli_args(tiny_models, tmp_path / "runs"), "device=tpu9"], ["device='tpu9' is not a device"]


def _study_name(tiny_models, tmp_path):
    return [*tiny_cli_args(tiny_models, tmp_path / "runs"), "study_name=../../escape"], [
        "study_name='../../escape' is not a plain name"]


def _same_splits(tiny_models, tmp_path):
    return [*tiny_cli_args(tiny_models, tmp_path / "runs"),
            "evaluator.tasks=[{name: zoo_add, search_split: search, heldout_split: search}]"], [
        "evaluator.tasks[0] ('zoo_add')", "search_split and heldout_split are both 'search'"]


def _postgres_unreachable(tiny_models, tmp_path):
    import importlib.util

    args = [*tiny_cli_args(tiny_models, tmp_path / "runs"), "storage=postgresql",
            f"storage.url=postgresql://mo:{PASSWORD}@127.0.0.1:1/optuna"]
    if not any(importlib.util.find_spec(m) for m in ("psycopg", "psycopg2")):  # `make test` without the extra
        return args, ["needs a PostgreSQL driver", "merge-optimizer[postgresql]"]
    return args, ["cannot open the study storage 'postgresql+", "mo:***@127.0.0.1:1/optuna", "storage=postgresql"]


CLI_CASES = {"truncated safetensors": _truncated, "NaN bounds": _nan_bounds,
             "unopenable SQLite URL": _sqlite_url_unopenable, "device=tpu9": _device,
             "study_name outside run_root": _study_name, "search_split == heldout_split": _same_splits,
             "unreachable PostgreSQL with a password in storage.url": _postgres_unreachable}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_exits_2(case, tiny_models, tmp_path):
    args, needles = CLI_CASES[case](tiny_models, tmp_path)
    r = cli(*args)
    assert_exit_2(r, *needles)
    assert trials_in(tmp_path / "runs") is None  # no study, no trial
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(PASSWORD not in p.read_text(errors="ignore") for p in written)  # hydra/.hydra/*.yaml included
    assert PASSWORD not in r.stdout + r.stderr
    if case.startswith("unreachable"):
        saved = list((tmp_path / "runs").rglob(".hydra/overrides.yaml"))
        assert saved and "storage.url=postgresql://mo:***@127.0.0.1:1/optuna" in saved[0].read_text()


def test_merge_overwrite_refuses_an_out_dir_holding_an_input(tiny_models, tmp_path):
    parent = tmp_path / "work"
    base = copy_model(tiny_models["base"], parent / "base")
    a = copy_model(tiny_models["a"], parent / "a")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                      f"  - model: {a}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    r = cli(str(recipe), str(parent), "--overwrite", module="optimizer.merge")
    assert_exit_2(r, f"OUT_DIR {str(parent.resolve())!r} contains the folder of input model")
    r = cli(str(recipe), str(base / "sub"), "--overwrite", module="optimizer.merge")
    assert_exit_2(r, "is inside the folder of input model")
    assert (base / "model.safetensors").exists() and (a / "model.safetensors").exists()


# ---------------------------------------------------------------- in-process run(cfg)

@pytest.fixture
def study(tiny_models, tmp_path):
    """An existing 2-trial study on the tiny models; yields its config."""
    cfg = make_cfg(tiny_models, tmp_path, n_trials=2)
    assert run(cfg) == 0
    return cfg


@contextlib.contextmanager
def no_loading(monkeypatch):
    """Fail the test if the models are loaded (errors must come first)."""
    def boom(s):
        raise AssertionError("the models were loaded before the bad input was found")

    monkeypatch.setattr("optimizer.runner.load", boom)
    yield


def _corrupt_header(cfg, tmp_path, tiny_models, monkeypatch):
    bad = copy_model(tiny_models["a"], tmp_path / "corrupt")
    data = (bad / "model.safetensors").read_bytes()
    header = b"\x20\x00\x00\x00\x00\x00\x00\x00{not json, not a header}"
    (bad / "model.safetensors").write_bytes(header + data[40:])
    return {"models": {"models": {"a": str(bad)}}}, "weight file"


def _missing_shard(cfg, tmp_path, tiny_models, monkeypatch):
    bad = copy_model(tiny_models["b_sharded"], tmp_path / "shards")
    next(bad.glob("model-00002-of-*.safetensors")).unlink()
    return {"models": {"models": {"b": str(bad)}}}, "named in model.safetensors.index.json is missing"


def _nan_bounds_resume(cfg, tmp_path, tiny_models, monkeypatch):
    return {"merge": {"bounds": {"weight": [float("nan"), 1.0]}}}, \
        "merge.bounds.weight=[nan, 1.0] must be finite"


def _remote_code(cfg, tmp_path, tiny_models, monkeypatch):
    base = copy_model(tiny_models["base"], tmp_path / "remote")
    conf = json.loads((base / "config.json").read_text())
    conf.update(model_type="my_custom_lm", auto_map={"AutoModelForCausalLM": "modeling_custom.MyLM"})
    (base / "config.json").write_text(json.dumps(conf))
    return {"models": {"base": str(base)}}, "needs its own Python code"


def _moe_calibrate_steps(cfg, tmp_path, tiny_models, monkeypatch):
    moe = {"base_model": str(tiny_models["base"]), "gate_mode": "random", "experts_per_token": 1,
           "experts": [{"source_model": str(tiny_models["a"]), "name": "a"},
                       {"source_model": str(tiny_models["b"]), "name": "b"}],
           "calibrate": {"steps": "many"}}
    return {"moe": moe}, "calibrate.steps='many' must be a number"


def _moe_calibrate_lr(cfg, tmp_path, tiny_models, monkeypatch):
    over, _ = _moe_calibrate_steps(cfg, tmp_path, tiny_models, monkeypatch)
    over["moe"]["calibrate"] = {"steps": 10, "lr": "fast"}
    return over, "calibrate.lr='fast' must be a number"


def _no_driver(cfg, tmp_path, tiny_models, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("psycopg", "psycopg2") else real(name, *a))
    return {"storage": {"kind": "postgresql", "url": "postgresql://u@127.0.0.1:1/db"}}, \
        "pip install 'merge-optimizer[postgresql]'"


def _postgres_url_not_postgres(cfg, tmp_path, tiny_models, monkeypatch):
    return {"storage": {"kind": "postgresql", "url": "mysql://u:pw@host/db"}}, "is not a PostgreSQL URL"


def _postgres_no_url(cfg, tmp_path, tiny_models, monkeypatch):
    monkeypatch.delenv("OPTUNA_STORAGE_URL", raising=False)
    return {"storage": {"kind": "postgresql"}}, "storage=postgresql needs a URL: set the environment variable"


def _sqlite_url_not_sqlite(cfg, tmp_path, tiny_models, monkeypatch):
    return {"storage": {"url": "postgresql://u:pw@h/db"}}, "is not an SQLite URL"


def _grace_period(cfg, tmp_path, tiny_models, monkeypatch):
    return {"storage": {"heartbeat_interval": 30, "grace_period": 10}}, "storage.grace_period=10 must exceed"


def _cuda_missing(cfg, tmp_path, tiny_models, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    return {"device": "cuda:7"}, "device='cuda:7' but no CUDA device"


def _other_models(cfg, tmp_path, tiny_models, monkeypatch):
    return {"models": {"models": {"a": str(tiny_models["b"])}}}, \
        "different models.models.a.files.model.safetensors"


def _weights_changed(cfg, tmp_path, tiny_models, monkeypatch):
    # same folder, other weights: the study was made with a copy that is now overwritten
    return {"_rewrite": True}, "different models.models.a.files.model.safetensors"


def _evaluator_limit(cfg, tmp_path, tiny_models, monkeypatch):
    return {"evaluator": {"limit": -5}}, "different evaluator.limit"


def _evaluator_tasks(cfg, tmp_path, tiny_models, monkeypatch):
    return {"evaluator": {"tasks": ["l0"]}}, "different evaluator.tasks"


def _objective(cfg, tmp_path, tiny_models, monkeypatch):
    return {"objective": {"objectives": [{"name": "w", "weights": {"l0": 2.0, "l1": 1.0}}]}}, \
        "different objective"


def _fused_value(cfg, tmp_path, tiny_models, monkeypatch):
    return {"fused_kernels": "sometimes"}, "fused_kernels='sometimes' is not a choice; use auto, on or off"


def _fused_without_compiler(cfg, tmp_path, tiny_models, monkeypatch):
    monkeypatch.setattr("optimizer.merge.fused.available", lambda device: "no C++ compiler (g++, c++ or clang++)")
    return {"fused_kernels": "on"}, "fused_kernels=on, but the compiled merge kernels cannot run on cpu"


def _bad_study_name(cfg, tmp_path, tiny_models, monkeypatch):
    return {"study_name": "a/b"}, "study_name='a/b' is not a plain name"


RESUME_CASES = {
    "corrupt safetensors header": _corrupt_header, "sharded checkpoint missing a shard": _missing_shard,
    "NaN bounds on resume": _nan_bounds_resume, "remote-code base": _remote_code,
    "MoE calibrate.steps a string": _moe_calibrate_steps, "MoE calibrate.lr a string": _moe_calibrate_lr,
    "storage=postgresql without a driver": _no_driver,
    "storage=postgresql with a mysql URL": _postgres_url_not_postgres,
    "storage=postgresql without a URL": _postgres_no_url,
    "sqlite storage.url not SQLite": _sqlite_url_not_sqlite,
    "grace period under the heartbeat": _grace_period, "device=cuda:7 without CUDA": _cuda_missing,
    "resume: other model behind a name": _other_models, "resume: weights changed in place": _weights_changed,
    "resume: evaluator.limit changed": _evaluator_limit, "resume: evaluator tasks changed": _evaluator_tasks,
    "resume: objective changed": _objective, "study_name with a slash": _bad_study_name,
    "fused_kernels not a choice": _fused_value, "fused_kernels=on without a compiler": _fused_without_compiler,
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_bad_input_is_a_user_error_before_loading_and_adds_nothing(case, tiny_models, tmp_path, monkeypatch):
    a = copy_model(tiny_models["a"], tmp_path / "a_copy")
    cfg = make_cfg(tiny_models, tmp_path, n_trials=2)
    cfg.models.models.a = str(a)
    cfg.evaluator.paths.a = str(a)
    assert run(cfg) == 0
    before = trials_in(tmp_path / "runs")
    over, needle = RESUME_CASES[case](cfg, tmp_path, tiny_models, monkeypatch)
    if over.pop("_rewrite", False):
        from safetensors.torch import load_file, save_file

        sd = load_file(str(a / "model.safetensors"))
        save_file({k: v * 1.01 for k, v in sd.items()}, str(a / "model.safetensors"),
                  metadata={"format": "pt"})
    with no_loading(monkeypatch), pytest.raises(UserError) as e:
        run(OmegaConf.merge(cfg, {"n_trials": 4}, over))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert trials_in(tmp_path / "runs") == before


# ---------------------------------------------------------------- disks

@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs at `path` (root); None where mounting is not allowed (the caller falls back)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_run_root(tiny_models, tmp_path):
    with tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        if ro is None:  # not root: a folder without write permission
            if os.geteuid() == 0:
                pytest.skip("root without mount: no way to make a folder read-only for root")
            ro = tmp_path / "ro"
            ro.chmod(0o555)
        cfg = make_cfg(tiny_models, tmp_path, n_trials=2, run_root=str(ro / "runs"))
        with pytest.raises(UserError,
                           match=r"run_root=.* is not writable \((read-only file system|Permission)"):
            run(cfg)


def test_full_disk_before_the_study(tiny_models, tmp_path, monkeypatch):
    with tmpfs(tmp_path / "full", "size=256k") as full:
        if full is None:  # not root: the disk reports 1 MiB free
            full = tmp_path / "full"
            real = shutil.disk_usage
            monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=2**20))
        cfg = make_cfg(tiny_models, tmp_path, n_trials=2, run_root=str(full / "runs"))
        with pytest.raises(UserError, match=r"MiB free, but the run needs about"):
            run(cfg)
        assert not (full / "runs" / "t" / "study.db").exists()


def test_disk_full_during_an_export_keeps_the_previous_one(tiny_models, tmp_path, monkeypatch, study):
    from transformers import PreTrainedModel

    best = tmp_path / "runs" / "t" / "best"
    before = (best / "scores.json").read_text()

    def full(self, path, *a, **kw):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "partial.bin").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    with pytest.raises(UserError,
                       match=r"cannot write the export .*best.*No space left on device \(disk full\)"):
        run(OmegaConf.merge(study, {"n_trials": 3}))
    assert (best / "scores.json").read_text() == before  # the previous export is untouched
    assert not [p for p in best.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

"""The real command line: bad input is one paragraph on stderr, exit code 2, and nothing is written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "optimizer", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def tiny_args(tiny_models, tmp_path, **models):
    return ["models=custom", f"models.base={tiny_models['base']}", f"run_root={tmp_path}/runs",
            *[f"+models.models.{k}={v}" for k, v in (models or {"a": tiny_models["a"]}).items()]]


@pytest.mark.parametrize("arg,needle", [("mode=bogus", "mode"), ("sampler=bogus", "sampler"),
                                        ("n_trials=many", "n_trials"), ("sampler.name=bogus", "sampler.name")])
def test_bad_overrides_exit_2(tmp_path, arg, needle):
    r = cli(arg, f"run_root={tmp_path}/runs")
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("study.db"))


def test_unknown_model_path(tmp_path):
    r = cli("models.base=/no/such/model", f"run_root={tmp_path}/runs")
    assert r.returncode == 2
    assert "models.base='/no/such/model': no such folder" in r.stderr and "Traceback" not in r.stderr
    assert not any((tmp_path / "runs").rglob("study.db")) if (tmp_path / "runs").exists() else True


def test_bounds_low_above_high(tmp_path, tiny_models):
    r = cli(*tiny_args(tiny_models, tmp_path), "merge.bounds.weight=[1.0,0.2]")
    assert r.returncode == 2, r.stderr
    assert "merge.bounds.weight=[1.0, 0.2]: low is greater than high" in r.stderr
    assert not any((tmp_path / "runs").rglob("study.db")) if (tmp_path / "runs").exists() else True


def test_models_that_differ_name_the_tensor(tmp_path, tiny_models):
    from transformers import MistralForCausalLM

    from .conftest import save_model, tiny_config

    other = save_model(MistralForCausalLM(tiny_config(num_hidden_layers=2)), tmp_path / "short")
    r = cli(*tiny_args(tiny_models, tmp_path, s=other))
    assert r.returncode == 2
    assert "has no tensor 'model.layers.2." in r.stderr


def test_help_lists_only_real_group_options():
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    groups = dict(line.split(": ", 1) for line in r.stdout.split("== Config ==")[0].splitlines() if ": " in line)
    conf = ROOT / "optimizer" / "conf"
    for group in ("models", "merge", "mode", "sampler", "storage", "pruner", "evaluator"):
        assert groups[group].split(", ") == sorted(p.stem for p in (conf / group).glob("*.yaml")), group
    assert "base_" not in r.stdout.split("== Config ==")[0]


def test_schema_node_is_not_a_group_option(tmp_path):
    r = cli("merge=base_merge", f"run_root={tmp_path}/runs")
    assert r.returncode == 2 and "Could not find 'merge/base_merge'" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_group_option_from_config_dir_is_still_typed(tmp_path):
    (tmp_path / "conf" / "merge").mkdir(parents=True)
    (tmp_path / "conf" / "merge" / "mine.yaml").write_text("method: ties\nbogus_key: 1\n")
    r = cli("--config-dir", str(tmp_path / "conf"), "merge=mine", f"run_root={tmp_path}/runs")
    assert r.returncode == 2 and "Key 'bogus_key' not in 'MergeConfig'" in r.stderr


def test_failing_judge_trials_are_one_line_each_and_stop_at_n_trials(tmp_path):
    """The zoo base as a local judge (`zoo://` like models.base) writes no [[rating]]: every trial fails.
    Each failure is one line with its reason verbatim, Optuna prints no parameter dump or traceback, and a
    run asked for 2 trials stops after 2 failures."""
    import optuna

    from optimizer.zoo import ensure_zoo

    ensure_zoo()
    r = cli("evaluator=mt_bench", "judge=local", "judge.model=zoo://base", "n_trials=2", "evaluator.limit=4",
            "evaluator.max_new_tokens=4", "judge.max_tokens=4", "mode=all", "study_name=jf",
            f"run_root={tmp_path}/runs", "threads=1")
    assert r.returncode == 2, r.stderr[-3000:]
    failed = [line for line in r.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 2 and all("no [[rating]] in the reply" in line for line in failed), r.stdout
    assert "Traceback" not in r.stderr and "failed with" not in r.stderr, r.stderr
    assert "2 trials failed in a row (as many as the 2 trials this run was asked for" in r.stderr
    study = optuna.load_study(study_name="jf", storage=f"sqlite:///{tmp_path}/runs/jf/study.db")
    assert len(study.trials) == 2

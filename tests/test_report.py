"""The study report: Optuna's plots and the coefficient heatmap, drawn from storage alone."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import optuna
import pytest

from optimizer.plots import _panels, exported_trial, write_plots

PNG = b"\x89PNG\r\n\x1a\n"
MODELS = ["add", "rev"]
UNITS = ["embed_tokens", "layer.0", "layer.1", "lm_head"]


def _names(kind="weight"):
    return [f"{kind}/{m}/{u}" for m in MODELS for u in UNITS]


def make_study(tmp_path, n=14, density=False, multi=False):
    """A study shaped like a run's: baselines first, space/heldout/references user attrs, per-unit params."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path}/study.db"
    kw = {"directions": ["maximize", "maximize"]} if multi else {"direction": "maximize"}
    study = optuna.create_study(study_name="t", storage=storage, sampler=optuna.samplers.RandomSampler(0), **kw)
    names = _names() + (_names("density") if density else []) + ["lambda/layer.0"]
    study.set_user_attr("space", {"method": "ties", "models": MODELS, "params": names, "pinned": {"epsilon": 0.1}})
    study.enqueue_trial({n: 1.0 for n in names}, user_attrs={"baseline": "weight=1.0"})
    study.enqueue_trial({n: 0.5 for n in names}, user_attrs={"baseline": "weight=0.5"})

    def objective(trial):
        x = {n: trial.suggest_float(n, 0.0, 1.5) for n in names}
        v = 1 - (x["weight/add/layer.0"] - 0.3) ** 2 - 0.3 * (x["weight/rev/layer.1"] - 1.2) ** 2
        return (v, -x["weight/add/lm_head"]) if multi else v

    study.optimize(objective, n_trials=n)
    done = sorted(study.trials, key=lambda t: -(t.values[0]))
    study.set_user_attr("heldout", {str(t.number): {"objective": t.values[0] - 0.01} for t in done[:3]})
    study.set_user_attr("references", {"base/search": {"objective": 0.2}, "add/search": {"objective": 0.4},
                                       "base/heldout": {"objective": 0.21}})
    return study


def test_report_draws_optuna_plots_and_the_heatmap(tmp_path):
    study = make_study(tmp_path)
    out = tmp_path / "report"
    out.mkdir()
    (out / "pareto.png").write_bytes(PNG)  # a stale picture of an earlier report goes away
    plots = write_plots(study, out, tmp_path)
    # two of the 17 parameters decide the objective, so the contour of those two is worth drawing
    assert list(plots.written) == ["history.png", "coefficients.png", "importances.png", "slice.png", "contour.png"]
    for name in plots.written:
        assert (out / name).read_bytes()[:8] == PNG, name
    assert not (out / "pareto.png").exists() and not plots.skipped
    md = "\n".join(plots.markdown())
    assert "![coefficients.png](coefficients.png)" in md and "![history.png](history.png)" in md


def test_contour_is_skipped_with_its_reason_when_it_would_show_noise(tmp_path):
    study = make_study(tmp_path, n=5)  # 5 trials (2 baselines): too few for a contour
    plots = write_plots(study, tmp_path, tmp_path)
    assert "contour.png" not in plots.written and not (tmp_path / "contour.png").exists()
    assert "5 completed trials" in plots.skipped["contour.png"]
    assert "- contour.png: not drawn (" in "\n".join(plots.markdown())


def test_heatmap_panels_are_models_by_units_per_parameter(tmp_path):
    study = make_study(tmp_path, n=3, density=True)
    trial = next(t for t in study.trials if t.number == 2)
    panels = {kind: (rows, units, values, bounds) for kind, rows, units, values, bounds in
              _panels(trial, study.user_attrs["space"])}
    assert list(panels) == ["weight", "density", "lambda"]
    rows, units, values, bounds = panels["weight"]
    assert rows == MODELS and units == UNITS and bounds == (0.0, 1.5)
    assert values[1][2] == pytest.approx(trial.params["weight/rev/layer.1"])
    assert panels["density"][2][0][3] == pytest.approx(trial.params["density/add/lm_head"])
    rows, units, values, _ = panels["lambda"]  # a global parameter is a one-row panel
    assert rows == ["all models"] and units == ["layer.0"] and values == [[trial.params["lambda/layer.0"]]]


def test_exported_trial_comes_from_best_scores_json(tmp_path):
    study = make_study(tmp_path, n=4)
    assert exported_trial(study, tmp_path)[0].number == study.best_trial.number  # no export yet
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "scores.json").write_text(json.dumps({"best": {"trial": 3, "chosen_by": "heldout"}}))
    trial, how = exported_trial(study, tmp_path)
    assert trial.number == 3 and "heldout" in how


def test_baseline_winner_also_shows_the_best_searched_trial(tmp_path):
    from optimizer.plots import _heatmap_trials

    study = make_study(tmp_path, n=4)
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "scores.json").write_text(json.dumps({"best": {"trial": 1, "chosen_by": "heldout"}}))
    shown = _heatmap_trials(study, tmp_path)
    assert [t.number for t, _ in shown][0] == 1 and len(shown) == 2
    assert "baseline" not in shown[1][0].user_attrs


def test_multi_objective_study_gets_the_pareto_front(tmp_path):
    study = make_study(tmp_path, n=6, multi=True)
    plots = write_plots(study, tmp_path, tmp_path)
    assert "pareto.png" in plots.written and "coefficients.png" in plots.written
    assert "history.png" not in plots.written and (tmp_path / "pareto.png").read_bytes()[:8] == PNG


def test_report_command_writes_markdown_with_pictures(tmp_path):
    from omegaconf import OmegaConf

    from optimizer.config import StorageConfig
    from optimizer.report import report

    run_dir = tmp_path / "t"
    run_dir.mkdir()
    make_study(run_dir, n=6)
    cfg = SimpleNamespace(run_root=str(tmp_path), study_name="t", storage=OmegaConf.structured(StorageConfig))
    assert report(cfg) == 0
    md = (run_dir / "report" / "report.md").read_text()
    assert "## Plots" in md and "![coefficients.png](coefficients.png)" in md
    assert "| parameter | importance |" in md
    assert not math.isnan(json.loads((run_dir / "report" / "report.json").read_text())["best"]["value"])

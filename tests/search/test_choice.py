"""The held-out choice always weighs every baseline; when nothing searched beats the best one, the export is
that baseline and the console, scores.json and the report say so."""

import json

from optimizer.report import markdown, summarize
from optimizer.runner import run

from ..test_runner import load, make_cfg


def test_the_baseline_wins_when_every_searched_trial_is_worse(tiny_models, tmp_path, capsys):
    # The toy's optimum is 0.3/0.6; with the box [1.0, 1.5] the 1.0 baseline is the closest point to it.
    cfg = make_cfg(tiny_models, tmp_path, n_trials=6, merge={"baselines": [{"weight": 1.0}],
                                                             "bounds": {"weight": [1.0, 1.5]}})
    assert run(cfg) == 0
    scores = json.loads((tmp_path / "runs/t/best/scores.json").read_text())
    assert scores["best"]["trial"] == 0 and scores["baselines"]["weight=1.0"]["trial"] == 0
    comp = scores["comparison"]
    assert comp["baseline_wins"] and comp["gain"]["vs best baseline"] == 0.0
    assert [r["what"] for r in comp["rows"]] == ["exported", "best baseline", "best expert", "base"]
    assert "the export IS that baseline" in capsys.readouterr().out
    assert "the export is that baseline" in markdown(summarize(load(cfg)))


def test_a_searched_trial_is_exported_only_when_it_beats_the_baselines(tiny_models, tmp_path, capsys):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=12, merge={"baselines": [{"weight": 1.5}]},
                   sampler={"name": "cmaes", "kwargs": {"sigma0": 0.3}})
    assert run(cfg) == 0
    scores = json.loads((tmp_path / "runs/t/best/scores.json").read_text())
    table = scores["heldout_table"]
    assert any(r["baseline"] == "weight=1.5" for r in table)  # re-scored on held-out whatever its search rank
    comp = scores["comparison"]
    assert not comp["baseline_wins"] and comp["gain"]["vs best baseline"] > 0
    assert scores["best"]["trial"] != 0
    exported = next(r for r in table if r["trial"] == scores["best"]["trial"])
    assert exported["heldout_rank"] == 1 and not exported["baseline"]
    out = capsys.readouterr().out
    assert "exported" in out and "gain (held-out): vs best baseline +" in out and "IS that baseline" not in out

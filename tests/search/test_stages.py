"""The stage schedule: warm starts begin at the best baseline, coarse stages write shared values, stages are
recorded on the study and a resumed study continues them where it stopped."""

import optuna
import pytest
from omegaconf import OmegaConf

from optimizer.runner import run
from optimizer.search import schedule as sch
from optimizer.search.coarse import coarse_groups, expand, project, unit_kind

from ..conftest import ToyEvaluator
from ..test_runner import load, make_cfg


def searched(study):
    return [t for t in study.trials if "baseline" not in t.user_attrs and t.state.is_finished()]


@pytest.mark.parametrize("warm, centre", [(True, 0.5), (False, 0.75)])
def test_cmaes_starts_at_the_best_baseline_only_when_warm(tiny_models, tmp_path, warm, centre):
    # The toy's optimum is 0.3/0.6: the 0.5 baseline beats 1.0. sigma0 0.02 of a 1.5 range = 0.03.
    cfg = make_cfg(tiny_models, tmp_path, n_trials=8, sampler={"name": "cmaes", "kwargs": {"sigma0": 0.02}},
                   search={"warm_start": warm}, export={"enabled": False})
    assert run(cfg) == 0
    study = load(cfg)
    assert max(study.trials[:2], key=lambda t: t.value).user_attrs["baseline"] == "weight=0.5"
    first = searched(study)[:4]
    assert len(first) == 4
    for t in first:
        assert all(abs(v - centre) < 0.15 for v in t.params.values()), t.params
        assert t.user_attrs["stage"] == "search"
    if warm:
        assert study.user_attrs[sch.STARTS_ATTR] == {"search": 1}


STAGES = [{"name": "model", "coarse": "model", "trials": 4, "sampler": "random"},
          {"name": "kind", "coarse": "kind", "trials": 3},
          {"name": "fine", "sigma0": 0.05}]


def staged_cfg(tiny_models, tmp_path, n_trials):
    return make_cfg(tiny_models, tmp_path, n_trials=n_trials, sampler={"name": "cmaes"},
                    search={"stages": STAGES}, export={"enabled": False})


def check_staged_study(study, space_units):
    stages = [t.user_attrs["stage"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert stages == ["baselines"] * 2 + ["model"] * 4 + ["kind"] * 3 + ["fine"] * 5
    plan = sch.recorded_plan(study)
    assert [(st.name, st.end) for st in plan] == [("baselines", 2), ("model", 6), ("kind", 9), ("fine", 14)]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in done:
        per_model = {}
        for name, v in t.params.items():
            _, model, unit = name.split("/")
            key = (model, unit_kind(unit)) if t.user_attrs["stage"] == "kind" else model
            per_model.setdefault(key, set()).add(round(v, 12))
        if t.user_attrs["stage"] in ("baselines", "model", "kind"):
            assert all(len(vs) == 1 for vs in per_model.values()), (t.number, t.params)
    fine = [t for t in done if t.user_attrs["stage"] == "fine"]
    assert any(len(set(t.params.values())) > 2 for t in fine)  # per-unit values at last
    # each stage starts from the best trial finished before it
    starts = study.user_attrs[sch.STARTS_ATTR]
    for name in ("model", "kind", "fine"):
        first = min(t.number for t in done if t.user_attrs["stage"] == name)
        before = [t for t in done if t.number < first]
        assert starts[name] == max(before, key=lambda t: (t.value, -t.number)).number


def test_coarse_to_fine_stages_in_one_study(tiny_models, tmp_path):
    cfg = staged_cfg(tiny_models, tmp_path, 14)
    assert run(cfg) == 0
    check_staged_study(load(cfg), 4)
    from optimizer.report import markdown, summarize

    summary = summarize(load(cfg))
    assert [(st["name"], st["trials"]) for st in summary["stages"]] == [
        ("baselines", 2), ("model", 4), ("kind", 3), ("fine", 5)]
    assert "## Search stages" in markdown(summary)


@pytest.mark.parametrize("stop_at", [4, 8])  # inside the model stage; inside the kind stage
def test_interrupted_stages_resume_where_they_stopped(tiny_models, tmp_path, monkeypatch, stop_at):
    cfg = staged_cfg(tiny_models, tmp_path, 14)
    real = ToyEvaluator.evaluate

    def interrupted(self, *a, **kw):
        if self.calls == stop_at:
            self.calls += 1
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(ToyEvaluator, "evaluate", interrupted)
    assert run(cfg) == 130
    plan = sch.recorded_plan(load(cfg))
    monkeypatch.setattr(ToyEvaluator, "evaluate", real)
    assert run(cfg) == 0
    study = load(cfg)
    assert sch.recorded_plan(study) == plan
    check_staged_study(study, 4)


def test_a_larger_budget_grows_the_last_stage(tiny_models, tmp_path):
    cfg = staged_cfg(tiny_models, tmp_path, 14)
    assert run(cfg) == 0
    assert run(OmegaConf.merge(cfg, {"n_trials": 17})) == 0
    study = load(cfg)
    stages = [t.user_attrs["stage"] for t in study.trials]
    assert stages[-8:] == ["fine"] * 8 and len(stages) == 17
    assert [st.end for st in sch.extended(sch.recorded_plan(study), 17)] == [2, 6, 9, 17]


def test_refine_stage_is_skipped_with_a_reason_without_gold_answers(tiny_models, tmp_path, capsys):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=5, sampler={"name": "cmaes"}, export={"enabled": False},
                   search={"stages": [{"name": "refine", "kind": "refine"}, {"name": "fine"}]})
    assert run(cfg) == 0
    study = load(cfg)
    assert [st.name for st in sch.recorded_plan(study)] == ["baselines", "fine"]
    assert "no gold answers" in study.user_attrs["search_notes"][0]
    assert "skipped" in capsys.readouterr().out


def test_make_plan_shares_and_counts():
    class St:
        def __init__(self, name, kind="sample", trials=0.0):
            self.name, self.kind, self.trials = name, kind, trials
            self.coarse = self.sampler = self.sigma0 = None
            self.kwargs = {}

    plan = sch.make_plan([St("a", trials=0.25), St("r", "refine"), St("b", trials=5), St("c")], 2, 50)
    assert [(st.name, st.end) for st in plan] == [("baselines", 2), ("a", 14), ("r", 15), ("b", 20), ("c", 50)]
    assert sch.stage_of(plan, 14).name == "r" and sch.stage_of(plan, 50) is None
    assert [st.end for st in sch.make_plan([], 2, 10)] == [2, 10]
    # a budget too small for every stage: later stages are empty, never negative
    assert [st.end for st in sch.make_plan([St("a", trials=8), St("c")], 2, 6)] == [2, 10, 10]


def test_coarse_groups_project_and_expand(tiny_models):
    from optimizer.merge.registry import METHODS
    from optimizer.models import ModelSet
    from optimizer.space import SearchSpace, derive_layout

    cfg = make_cfg(tiny_models, tmp_path=__import__("pathlib").Path("/tmp"))
    models = ModelSet(cfg.models)
    for granularity, kinds in (("layer", {"embed", "layers", "head", "norm"}),
                               ("parameter", {"embed", "attn", "mlp", "norm", "head"})):
        space = SearchSpace(METHODS["ties"], models.names, derive_layout(models.tensor_names, granularity), cfg.merge)
        by_model = coarse_groups(space, "model")
        assert [g.name for g in by_model] == ["weight/a/*", "weight/b/*", "density/a/*", "density/b/*"]
        by_kind = coarse_groups(space, "kind")
        assert {g.name.split("/")[-1] for g in by_kind} == kinds
        assert sorted(m for g in by_kind for m in g.members) == sorted(p.name for p in space.params)
        z = {g.name: 0.1 * (i + 1) for i, g in enumerate(by_kind)}
        full = expand(by_kind, z)
        assert project(by_kind, full) == pytest.approx(z)
        assert project(by_model, full) is None  # kinds differ inside a model: not a per-model point


def test_coarse_stage_after_a_finer_best_trial_is_skipped(tiny_models, tmp_path):
    # The only baseline (all 1.5) is far from the toy's optimum: the first stage's per-unit trials beat it,
    # so the per-model stage after it has nothing coarse to start from and gives its trials to the last.
    stages = [{"name": "first", "trials": 5}, {"name": "model", "coarse": "model", "trials": 3}, {"name": "last"}]
    cfg = make_cfg(tiny_models, tmp_path, n_trials=10, sampler={"name": "cmaes", "kwargs": {"sigma0": 0.3}},
                   merge={"baselines": [{"weight": 1.5}]}, search={"stages": stages}, export={"enabled": False})
    assert run(cfg) == 0
    study = load(cfg)
    assert [t.user_attrs["stage"] for t in study.trials] == ["baselines"] + ["first"] * 5 + ["last"] * 4
    assert [(st.name, st.end) for st in sch.recorded_plan(study)] == [
        ("baselines", 1), ("first", 6), ("model", 6), ("last", 10)]
    assert "finer than its groups" in study.user_attrs["search_notes"][-1]

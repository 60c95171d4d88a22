"""What a run leaves behind: per-trial artifacts the dashboard serves, user attrs, and never the API key.

The runner is emulated here the way the contract describes it (upload Scores.artifacts with
optuna.artifacts.upload_artifact, set user attrs from Scores.info).
"""

import io
import json
import logging
from wsgiref.util import setup_testing_defaults

import optuna
from judge_fakes import KEY_ENV, SECRET
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna_dashboard import wsgi

from optimizer.eval.base import EvaluationFailed


def _objective(ev, model, tok, store, tmp_path):
    def objective(trial):
        try:
            scores = ev.evaluate(model, tok, "search")
            artifacts, info, value = scores.artifacts, scores.info, scores.tasks["mt_bench"]
        except EvaluationFailed as e:  # a failed trial keeps its audit trail
            artifacts, info, value = e.artifacts, e.info, None
        for name, text in artifacts.items():
            path = tmp_path / "upload" / f"{trial.number}-{name}"
            path.parent.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                            mimetype="application/jsonl", encoding="utf-8")
        for k, v in info.items():
            trial.set_user_attr(k, v)
        if value is None:
            raise optuna.TrialPruned()
        return value

    return objective


def _get(app, path):
    env = {"PATH_INFO": path, "wsgi.input": io.BytesIO()}
    setup_testing_defaults(env)
    status = []
    body = b"".join(app(env, lambda s, h, exc_info=None: status.append(s)))
    return status[0], body


def test_artifacts_open_in_dashboard_and_no_key_anywhere(tiny_lm, openai_server, judge_key, make_evaluator,
                                                         tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # the SDK's and HTTP client's debug logs too
    model, tok = tiny_lm
    openai_server.faults.extend(["401", "429:ms", "500"])  # an auth error and retries end up in texts and logs
    ev = make_evaluator(openai_server, limit=4, heldout_share=0.0, max_failed_share=0.5)
    run_dir = tmp_path / "runs" / "study"
    (run_dir / "artifacts").mkdir(parents=True)
    store = FileSystemArtifactStore(str(run_dir / "artifacts"))
    storage = f"sqlite:///{run_dir / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="judge-audit", direction="maximize")
    study.optimize(_objective(ev, model, tok, store, tmp_path), n_trials=2)

    first, second = study.trials
    assert first.user_attrs["judge_failures"] == 1 and first.user_attrs["judge_new"] == 7
    assert second.user_attrs["judge_cache_hits"] == 7 and second.user_attrs["judge_new"] == 1  # only the 401 one
    app = wsgi(storage, artifact_store=store)
    served = {}
    for t in study.trials:
        metas = {m.filename.split("-", 1)[1]: m for m in get_all_artifact_meta(t, storage=study._storage)}
        assert set(metas) == {"answers.jsonl", "judgments.jsonl"}
        status, body = _get(app, f"/artifacts/{study._study_id}/{t._trial_id}/{metas['judgments.jsonl'].artifact_id}")
        assert status.startswith("200")
        served[t.number] = [json.loads(line) for line in body.decode().splitlines()]
        assert len(served[t.number]) == 8 and all("user_prompt" in j for j in served[t.number])
    bad = [j for j in served[0] if j["score"] is None]
    assert len(bad) == 1 and KEY_ENV in bad[0]["error"]  # names the variable, never its value

    status, body = _get(app, f"/api/studies/{study._study_id}")
    assert status.startswith("200") and SECRET.encode() not in body
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == ".judge_cache.sqlite" for p in files) and any(p.name == "study.db" for p in files)
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p
    out, err = capfd.readouterr()
    assert SECRET not in caplog.text and SECRET not in out and SECRET not in err
    assert any("retry" in r.getMessage() for r in caplog.records)  # the logs were really captured

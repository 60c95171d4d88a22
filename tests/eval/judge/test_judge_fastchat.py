"""FastChat interop: its named conversation templates (the `fastchat` extra), and a judge study's answers and
judgments in FastChat's llm_judge layout, read back by FastChat's own result tool when fschat is installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from judge_fakes import build_tokenizer
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from optimizer import UserError
from optimizer.eval.judge import audit
from optimizer.eval.judge.bench import Question
from optimizer.eval.judge.chat import NAMED_TEMPLATES, check_conv_template, render_chat
from optimizer.eval.judge.fastchat import FAILED_SCORE, judge_file, write_layout
from optimizer.eval.judge.scoring import Judgment

HAVE_FASTCHAT = importlib.util.find_spec("fastchat") is not None
NO_FASTCHAT = "fschat is not installed (pip install -e '.[fastchat]'): FastChat's own code is not exercised"
JUDGE = "gpt-4o"
QUESTIONS = [Question(81, "writing", ("Write a haiku.", "Now in Japanese.")), Question(82, "math", ("1+1?",))]
# trial -> ratings of (q81 turn 1, q81 turn 2, q82 turn 1); None = a judgment without a rating
RATINGS = {0: [8.0, 6.0, 10.0], 1: [4.0, None, 2.0]}


def judgments(ratings: list[float | None]) -> list[Judgment]:
    slots = [(81, "writing", 1), (81, "writing", 2), (82, "math", 1)]
    return [Judgment(q, cat, turn, 0, JUDGE, "single-v1", r, r, False, False,
                     None if r is not None else "no [[rating]] in the reply",
                     None if r is None else f"Fine. Rating: [[{r:g}]]", f"judge q{q} t{turn}")
            for (q, cat, turn), r in zip(slots, ratings, strict=True)]


def judge_study(tmp_path: Path) -> tuple[optuna.Study, object, Path]:
    """A study whose trials carry answers.jsonl / judgments.jsonl artifacts, uploaded as the runner does."""
    run_dir = tmp_path / "runs" / "mt"
    (run_dir / "artifacts").mkdir(parents=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{run_dir / 'study.db'}")
    study = optuna.create_study(study_name="mt", storage=storage, direction="maximize")
    study.set_user_attr("config", {"evaluator": {"name": "mt_bench", "bench_dir": "data/mt_bench/en"}})
    store = FileSystemArtifactStore(str(run_dir / "artifacts"))
    for number, ratings in RATINGS.items():
        trial = study.ask()
        files = {audit.ANSWERS_FILE: audit.answers_jsonl(QUESTIONS, [[f"a{number}", f"b{number}"], [f"c{number}"]]),
                 audit.JUDGMENTS_FILE: audit.judgments_jsonl(judgments(ratings))}
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / name).write_text(text, encoding="utf-8")
                upload_artifact(artifact_store=store, file_path=str(Path(tmp) / name), study_or_trial=trial)
        study.tell(trial, sum(r for r in ratings if r) / 3)
        assert trial.number == number
    return study, storage, run_dir


def test_trials_are_written_in_fastchats_layout(tmp_path):
    study, storage, run_dir = judge_study(tmp_path)
    root = write_layout(study, storage, run_dir)
    assert root == run_dir / "fastchat" / "data" / "mt_bench"
    assert sorted(p.name for p in (root / "model_answer").iterdir()) == ["trial_0.jsonl", "trial_1.jsonl"]
    answers = [json.loads(x) for x in (root / "model_answer" / "trial_1.jsonl").read_text().splitlines()]
    assert [(a["question_id"], a["model_id"], a["choices"][0]["turns"]) for a in answers] == [
        (81, "trial_1", ["a1", "b1"]), (82, "trial_1", ["c1"])]
    rows = [json.loads(x) for x in (root / "model_judgment" / f"{JUDGE}_single.jsonl").read_text().splitlines()]
    assert [(r["model"], r["question_id"], r["turn"], r["score"]) for r in rows] == [
        ("trial_0", 81, 1, 8.0), ("trial_0", 81, 2, 6.0), ("trial_0", 82, 1, 10.0),
        ("trial_1", 81, 1, 4.0), ("trial_1", 81, 2, FAILED_SCORE), ("trial_1", 82, 1, 2.0)]
    assert all(r["judge"] == [JUDGE, "single-v1"] and r["user_prompt"] for r in rows)
    assert (root / "question.jsonl").read_text() == (Path(__file__).parents[3] / "optimizer" / "data" / "mt_bench"
                                                      / "en" / "question.jsonl").read_text()


def test_judge_ids_become_file_names():
    assert judge_file("gpt-4o") == "gpt-4o_single.jsonl"
    assert judge_file("local:zoo://base") == "local_zoo_base_single.jsonl"


def test_a_study_without_judge_artifacts_gets_no_layout(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    (tmp_path / "artifacts").mkdir()
    assert write_layout(study, storage, tmp_path) is None and not (tmp_path / "fastchat").exists()


def test_the_report_writes_the_layout_and_names_the_fastchat_command(tmp_path, capsys):
    from omegaconf import OmegaConf

    from optimizer.config import StorageConfig
    from optimizer.report import report

    judge_study(tmp_path)
    cfg = SimpleNamespace(run_root=str(tmp_path / "runs"), study_name="mt", storage=OmegaConf.structured(StorageConfig))
    assert report(cfg) == 0
    out = capsys.readouterr().out
    assert "FastChat layout written to" in out and "fastchat.llm_judge.show_result --bench-name mt_bench" in out
    assert (tmp_path / "runs" / "mt" / "fastchat" / "data" / "mt_bench" / "model_judgment").is_dir()


@pytest.mark.skipif(not HAVE_FASTCHAT, reason=NO_FASTCHAT)
def test_fastchats_show_result_reads_the_layout(tmp_path):
    pytest.importorskip("pandas", reason="FastChat's show_result.py needs pandas")
    study, storage, run_dir = judge_study(tmp_path)
    root = write_layout(study, storage, run_dir)
    r = subprocess.run([sys.executable, "-m", "fastchat.llm_judge.show_result", "--bench-name", "mt_bench",
                        "--judge-model", JUDGE], cwd=root.parent.parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    average = r.stdout.split("########## Average ##########")[1]
    means = {line.split()[0]: float(line.split()[1]) for line in average.splitlines()
             if line.startswith("trial_")}
    assert means == {"trial_0": pytest.approx(8.0), "trial_1": pytest.approx(3.0)}  # the -1 left out
    from fastchat.llm_judge.common import load_model_answers, load_questions, load_single_model_judgments

    answers = load_model_answers(str(root / "model_answer"))
    assert {m: sorted(v) for m, v in answers.items()} == {"trial_0": [81, 82], "trial_1": [81, 82]}
    judged = load_single_model_judgments(str(root / "model_judgment" / f"{JUDGE}_single.jsonl"))
    assert judged[(JUDGE, "single-v1")][(82, "trial_0")]["score"] == 10.0
    assert [q["question_id"] for q in load_questions(str(root / "question.jsonl"), None, None)][:1] == [1]


@pytest.mark.skipif(not HAVE_FASTCHAT, reason=NO_FASTCHAT)
def test_fastchat_named_templates_prompt_a_model_without_chat_template():
    from fastchat.conversation import get_conv_template

    bare = build_tokenizer(chat_template=None)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    for name in ("vicuna_v1.1", "llama-2", "zephyr"):
        check_conv_template(name, "evaluator.conv_template")
        conv = get_conv_template(name)
        conv.set_system_message("Be brief.")
        for role, text in (("user", "hi"), ("assistant", "hello"), ("user", "again")):
            conv.append_message(conv.roles[0 if role == "user" else 1], text)
        conv.append_message(conv.roles[1], None)
        text, stops = render_chat(bare, messages, name)
        assert text == conv.get_prompt(), name
        assert all(stops) and set(stops) <= {*([conv.stop_str] if isinstance(conv.stop_str, str) else
                                               conv.stop_str or [])}
    with pytest.raises(UserError, match=r"conv_template='vicuna_v1\.2' is unknown.*close: vicuna_v1\.1"):
        check_conv_template("vicuna_v1.2", "evaluator.conv_template")


@pytest.mark.skipif(HAVE_FASTCHAT, reason="fschat is installed; the missing-extra message is not reachable")
def test_without_fschat_a_fastchat_name_asks_for_the_extra():
    with pytest.raises(UserError, match=r"evaluator.conv_template='vicuna_v1.1' is unknown.*merge-optimizer\[fastchat\]"):
        check_conv_template("vicuna_v1.1", "evaluator.conv_template")
    for name in NAMED_TEMPLATES:  # ours need nothing extra
        check_conv_template(name, "evaluator.conv_template")

"""Optuna plumbing: storage URLs and drivers, secrets kept out of everything written, resume identity."""

from __future__ import annotations

import shutil

import optuna
import pytest
from omegaconf import OmegaConf

from optimizer import UserError
from optimizer.config import StorageConfig
from optimizer.fingerprint import file_digest, first_difference
from optimizer.runner import run
from optimizer.secrets import redact, redact_text, remember
from optimizer.study import storage_url, with_driver

from .postgres_server import PASSWORD, postgres  # noqa: F401  (fixture)
from .test_runner import make_cfg


def test_redaction_covers_urls_libpq_and_secret_keys():
    assert redact_text("postgresql://bob:pa55word@db:5432/x?sslmode=require") == \
        "postgresql://bob:***@db:5432/x?sslmode=require"
    assert redact_text("redis://:tok3n@host/0") == "redis://:***@host/0"
    assert redact_text("host=db user=bob password=pa55word dbname=x") == \
        "host=db user=bob password=*** dbname=x"
    assert redact_text("sqlite:////tmp/x.db and http://host:8000/v1") == "sqlite:////tmp/x.db and http://host:8000/v1"
    remember("postgresql://bob:rememb3red@db/x")
    assert redact_text("FATAL: bad password rememb3red") == "FATAL: bad password ***"
    doc = redact({"storage": {"url": "postgresql://a:b1c2d3@h/d"},
                  "judge": {"api_key": "sk-123", "api_key_env": "K"},
                  "list": ["x", "mysql://u:p4ssw0rd@h/d"], "n": 3})
    assert doc == {"storage": {"url": "postgresql://a:***@h/d"},
                   "judge": {"api_key": "***", "api_key_env": "K"},
                   "list": ["x", "mysql://u:***@h/d"], "n": 3}


def test_postgres_url_gets_an_installed_driver(monkeypatch, tmp_path):
    import importlib.util

    if any(importlib.util.find_spec(m) for m in ("psycopg", "psycopg2")):
        url = with_driver("postgresql://u:p@h/db")
        assert url.split("://")[0] in ("postgresql+psycopg", "postgresql+psycopg2")
        assert with_driver("postgres://u@h/db").startswith("postgresql+")
    else:  # `make test` without the postgresql extra: the error names it
        with pytest.raises(UserError, match=r"merge-optimizer\[postgresql\]"):
            with_driver("postgresql://u:p@h/db")
    with pytest.raises(UserError, match="is not a PostgreSQL URL"):
        with_driver("mysql://u@h/db")
    monkeypatch.setenv("MY_PG", "postgresql://u:envpw99@h/db")
    cfg = OmegaConf.merge(OmegaConf.structured(StorageConfig), {"kind": "postgresql", "url_env": "MY_PG"})
    if any(importlib.util.find_spec(m) for m in ("psycopg", "psycopg2")):
        assert storage_url(cfg, tmp_path).endswith("://u:envpw99@h/db")
    else:
        with pytest.raises(UserError, match="needs a PostgreSQL driver"):
            storage_url(cfg, tmp_path)
    assert "envpw99" not in redact_text("connection to u:envpw99@h failed")  # the env var's password is known


def test_fingerprint_names_the_first_difference(tmp_path):
    stored = {"models.base": {"files": {"model.safetensors": "10:aa"}}, "evaluator": {"limit": 5}}
    assert first_difference(stored, stored) is None
    assert first_difference(stored, {**stored, "evaluator": {"limit": -5}}) == "evaluator.limit"
    other = {"models.base": {"files": {"model.safetensors": "10:bb"}}, "evaluator": {"limit": 5}}
    assert first_difference(stored, other) == "models.base.files.model.safetensors"
    f = tmp_path / "w.bin"
    f.write_bytes(bytes(range(256)) * 20000)  # 5 MB: sampled blocks
    shutil.copy(f, tmp_path / "copy.bin")
    assert file_digest(f) == file_digest(tmp_path / "copy.bin")  # a copy (new mtime) hashes the same
    data = bytearray(f.read_bytes())
    data[-10] ^= 1
    f.write_bytes(bytes(data))
    assert file_digest(f) != file_digest(tmp_path / "copy.bin")


def test_same_settings_resume_and_old_studies_get_a_fingerprint(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, tmp_path, n_trials=2)
    assert run(cfg) == 0
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path}/runs/t/study.db")
    fp = study.user_attrs["fingerprint"]
    assert fp["paths"]["models.models.b"] == str(tiny_models["b_sharded"].resolve())
    assert len(fp["models.models.b"]["files"]) > 3  # every shard, config and tokenizer file
    study.set_user_attr("fingerprint", None)  # as if created before fingerprints existed
    assert run(OmegaConf.merge(cfg, {"n_trials": 3, "sampler": {"name": "random"}, "device": "cpu"})) == 0
    assert optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path}/runs/t/study.db").user_attrs[
        "fingerprint"] is not None


def test_no_password_in_the_study_config_console_or_files_with_postgres(tiny_models, tmp_path, capsys,
                                                                       request):
    url = request.getfixturevalue("postgres")
    cfg = make_cfg(tiny_models, tmp_path, n_trials=2, study_name="pw",
                   storage={"kind": "postgresql", "url": url})
    assert run(cfg) == 0
    out = capsys.readouterr()
    assert PASSWORD not in out.out + out.err
    assert "storage.url holds a password" in out.out
    study = optuna.load_study(study_name="pw", storage=with_driver(url))
    assert study.user_attrs["config"]["storage"]["url"].startswith("postgresql://mo:***@127.0.0.1")
    assert PASSWORD not in str(study.user_attrs)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and PASSWORD in p.read_text(errors="ignore")]

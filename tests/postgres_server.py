"""A real, throwaway PostgreSQL server for the tests (Debian's `postgresql`; .ci/postgres-env installs it).

`postgres` (session fixture) runs `initdb` into a temporary folder and starts the server on a free port of
127.0.0.1 with password authentication (and trust on its private unix socket), as the `postgres` user when
the tests run as root. It yields `postgresql://mo:PASSWORD@127.0.0.1:PORT/optuna`. Tests that use it skip,
saying why, where the server binaries or the Python driver are missing (and fail instead with
MERGE_OPTIMIZER_POSTGRES=require, which .ci/postgres-env prints).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

PASSWORD = "Pg-t3st-s3cret"
INSTALL = "run .ci/postgres-env (apt-get install -y postgresql) to run it"
REQUIRED = os.environ.get("MERGE_OPTIMIZER_POSTGRES") == "require"  # set by .ci/postgres-env: fail, not skip


def _skip(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"MERGE_OPTIMIZER_POSTGRES=require but {reason}")
    pytest.skip(reason)


def server_bin(name: str) -> str | None:
    """`initdb`/`pg_ctl` on PATH, else from the newest /usr/lib/postgresql/<version>/bin (Debian layout)."""
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return cands[-1] if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    initdb, pg_ctl = server_bin("initdb"), server_bin("pg_ctl")
    if not (initdb and pg_ctl):
        _skip(f"PostgreSQL server binaries (initdb, pg_ctl) are not installed; {INSTALL}")
    if not (find_spec("psycopg") or find_spec("psycopg2")):
        _skip("no PostgreSQL driver: pip install 'merge-optimizer[postgresql]'")
    as_root = os.geteuid() == 0
    if as_root and not shutil.which("runuser"):
        _skip("running as root without runuser: PostgreSQL refuses to run as root")
    root = Path(tempfile.mkdtemp(prefix="mo-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    (root / "pw").write_text(PASSWORD)
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(root, "postgres")
        for p in (sock, root / "pw"):
            shutil.chown(p, "postgres")
    port = _free_port()

    def sh(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)

    r = sh(initdb, "-D", str(data), "-U", "mo", f"--pwfile={root / 'pw'}", "--auth-local=trust",
           "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
    if r.returncode:
        shutil.rmtree(root, ignore_errors=True)
        _skip(f"initdb failed: {r.stderr.strip()[-300:]}")
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
    r = sh(pg_ctl, "-D", str(data), "-l", str(root / "log"), "-o", opts, "-w", "-t", "60", "start")
    if r.returncode:
        log = (root / "log").read_text(errors="replace")[-500:] if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        _skip(f"the PostgreSQL server did not start: {r.stderr.strip()[-300:]} {log}")
    try:
        import sqlalchemy

        from optimizer.study import with_driver

        admin = sqlalchemy.create_engine(with_driver(f"postgresql://mo:{PASSWORD}@127.0.0.1:{port}/postgres"),
                                         isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(sqlalchemy.text("CREATE DATABASE optuna"))
        admin.dispose()
        yield f"postgresql://mo:{PASSWORD}@127.0.0.1:{port}/optuna"
    finally:
        sh(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)

"""Persistent judgment cache: an identical (judge, prompt, question, answer) is never paid for twice.

SQLite in WAL mode with a busy timeout, so several workers (processes) of one study, or of different
studies sharing `runs/`, read and write it at once. Only parseable judgments are stored: a failed or garbled
reply is asked again next time rather than remembered as a failure.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """CREATE TABLE IF NOT EXISTS judgments (
    key TEXT PRIMARY KEY, judge TEXT NOT NULL, prompt TEXT NOT NULL, text TEXT NOT NULL,
    tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL, created REAL NOT NULL)"""


def judgment_key(**parts: Any) -> str:
    """A stable hash of everything that determines a judgment (dict order and Python hash seed do not matter).

    >>> judgment_key(a=1, b="x") == judgment_key(b="x", a=1)
    True
    """
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class CachedJudgment:
    text: str
    tokens_in: int
    tokens_out: int


class JudgmentCache:
    """SQLite-backed map key -> judgment text (+ the tokens it cost once).

    Args:
        path: the database file (created with its folder).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # autocommit (isolation_level=None): each insert is its own short transaction, so a crashed worker
        # never holds the write lock and never loses other workers' judgments.
        self._db = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout = 60000")
        try:
            self._db.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:  # another process is switching it right now; its choice stands
            pass
        self._db.execute(_SCHEMA)

    def get_many(self, keys: list[str]) -> dict[str, CachedJudgment]:
        """The cached judgments among `keys`."""
        found: dict[str, CachedJudgment] = {}
        with self._lock:
            for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
                chunk = keys[i:i + 500]
                rows = self._db.execute(
                    f"SELECT key, text, tokens_in, tokens_out FROM judgments WHERE key IN ({','.join('?' * len(chunk))})",
                    chunk).fetchall()
                found.update({k: CachedJudgment(t, ti, to) for k, t, ti, to in rows})
        return found

    def put(self, key: str, *, judge: str, prompt: str, text: str, tokens_in: int, tokens_out: int) -> None:
        """Store one judgment (a concurrent writer of the same key wins; both texts are equally valid)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (key, judge, prompt, text, tokens_in, tokens_out, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

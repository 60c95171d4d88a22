"""Inter-process locks on lock files (fcntl.flock: the kernel frees them when the holder dies, kill -9 too).

Reentrant within a process (a function holding the lock may call another that takes it); meant for the main
thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from optimizer import UserError

_held: dict[str, list[int]] = {}  # resolved path -> [fd, depth]


@contextmanager
def file_lock(path: Path, what: str = "lock") -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing); blocks until other processes release it."""
    key = str(Path(path).resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        Path(key).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        ro = " (read-only file system)" if e.errno == errno.EROFS else ""
        raise UserError(f"cannot create the {what} file {key!r}: {e.strerror or e}{ro}; point run_root at a "
                        "writable folder.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held[key] = [fd, 1]
        try:
            yield
        finally:
            del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

"""Keep passwords out of everything written or printed: config copies, study attributes, console lines.

Passwords reach a run through storage URLs (`postgresql://user:PASSWORD@host/db`), preferably from the
environment variable `storage.url_env` names, never from a file. `redact` replaces them wherever they occur:
URL userinfo, libpq `password=...` parameters, keys that name a secret, and the literal password of any
storage URL this process was given (so an error message quoting it is cleaned too).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

MASK = "***"

# scheme://user:password@host  (the user part may be empty: redis://:password@host)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*://[^\s:/@]*:)(?P<pw>[^\s@/]+)(?P<at>@)")
# libpq keyword/value and query-string forms: password=..., ?password=...&
_KV_PASSWORD = re.compile(r"(?P<head>\b(?:password|passwd|pwd)\s*=\s*)(?P<pw>[^\s&;'\"]+)", re.IGNORECASE)
# config keys whose string value is itself a secret (api_key_env holds a variable NAME and is kept)
_SECRET_KEY = re.compile(
    r"^(?:.*_)?(?:password|passwd|secret|api_key|apikey|access_token|auth_token|hf_token)$", re.IGNORECASE)

_known: set[str] = set()


def remember(url: str | None) -> None:
    """Note the password of a URL this process uses, so any later text quoting it is redacted."""
    pw = url_password(url)
    if pw and len(pw) >= 4:
        _known.add(pw)


def url_password(url: str | None) -> str | None:
    if not url:
        return None
    m = _URL_PASSWORD.search(url)
    if m:
        from urllib.parse import unquote

        return unquote(m["pw"])
    m = _KV_PASSWORD.search(url)
    return m["pw"] if m else None


def has_password(url: str | None) -> bool:
    return bool(url_password(url))


def redact_text(text: str) -> str:
    """`text` with URL passwords, `password=` values and every remembered password replaced by ***."""
    out = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['at']}", text)
    out = _KV_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", out)
    for pw in sorted(_known | _env_passwords(), key=len, reverse=True):
        out = out.replace(pw, MASK)
    return out


def redact(obj: Any) -> Any:
    """A copy of a plain container (dicts, lists, strings) with every secret replaced by ***."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(k, str) and _SECRET_KEY.match(k) and isinstance(v, str) and v
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def _env_passwords() -> set[str]:
    """Passwords of storage URLs in the usual environment variables (whether or not this run read them)."""
    out = set()
    for name in _env_names():
        pw = url_password(os.environ.get(name))
        if pw and len(pw) >= 4:
            out.add(pw)
    return out


_ENV_NAMES: set[str] = {"OPTUNA_STORAGE_URL"}


def _env_names() -> Iterable[str]:
    return _ENV_NAMES


def watch_env(name: str | None) -> None:
    """Also redact the password of the URL in environment variable `name` (storage.url_env)."""
    if name:
        _ENV_NAMES.add(name)

"""Resume identity: everything that makes two trials' scores comparable, stored on the study.

A study may be resumed only by a run whose fingerprint equals the stored one: the same model weights (a
content hash of every weight, config and tokenizer file; not their paths, so workers on other machines may
keep the files elsewhere; the paths are stored for messages), the same method, space and bounds, the same
evaluator (tasks, splits, limits, ...), judge (when one scores) and objective. What does not change scores
(sampler, pruner, n_trials, device, threads, fused_kernels, batch sizes, retries, export settings) is left out, so a study
can be resumed with another sampler or on another machine.

Everything here reads file headers and a few sampled blocks only; it runs before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from optimizer import UserError
from optimizer.dtypes import dtype_name

if TYPE_CHECKING:
    import optuna

    from optimizer.checkpoint import Checkpoint
    from optimizer.session import Session

ATTR = "fingerprint"
VERSION = 2  # v1 (never released) compared model paths too
PATHS = "paths"

# Keys of evaluator / judge nodes that change how fast or how robustly scores are computed, not the scores.
NEUTRAL_KEYS = frozenset({
    "batch_size", "chunk_size", "cache", "cache_path", "parallel", "timeout", "max_retries", "backoff_base",
    "backoff_max", "jitter", "retry_after_max", "price_input_per_mtok", "price_output_per_mtok",
    "api_key_env", "share_context",
})
_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
               "merges.txt", "special_tokens_map.json", "chat_template.jinja")
_BLOCK = 1 << 16
_SAMPLES = 16


def file_digest(path: Path) -> str:
    """`size:sha256` of a file; files over 1 MiB are hashed from 16 evenly spaced 64 KiB blocks plus their
    first and last block (weights rewritten by any training or conversion change every block)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _SAMPLES * _BLOCK:
            h.update(f.read())
        else:
            for i in range(_SAMPLES + 1):
                f.seek(min(i * (size - _BLOCK) // _SAMPLES, size - _BLOCK))
                h.update(f.read(_BLOCK))
    return f"{size}:{h.hexdigest()[:20]}"


def model_identity(ckpt: Checkpoint) -> dict[str, Any]:
    """What a checkpoint's weight, config and tokenizer files hold (not where they are: workers on other
    machines may keep the same files elsewhere)."""
    root = Path(ckpt.path)
    files = sorted({Path(f) for f in ckpt.files.values()} |
                   {root / n for n in (*_SIDE_FILES, "model.safetensors.index.json") if (root / n).is_file()})
    try:
        digests = {str(f.relative_to(root)) if f.is_relative_to(root) else str(f): file_digest(f)
                   for f in files}
    except OSError as e:
        raise UserError(f"{ckpt.what}={ckpt.ref!r}: cannot read {e.filename!r} ({e.strerror}).") from None
    return {"files": digests}


def _plain(node: Any, drop: frozenset[str] = frozenset()) -> Any:
    if node is None:
        return None
    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in sorted(x.items()) if k not in drop}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(data)


def _names(node: Any) -> set[str]:
    """Every `name:` value in an evaluator tree (a composite's parts included)."""
    out: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("name"), str):
            out.add(node["name"])
        for v in node.values():
            out |= _names(v)
    elif isinstance(node, list):
        for v in node:
            out |= _names(v)
    return out


def fingerprint(s: Session) -> dict[str, Any]:
    """Ordered key -> value; the first key that differs is the one a refusal names."""
    cfg, m = s.cfg, s.models
    ckpts = {"models.base": m.base, **{f"models.models.{n}": c for n, c in m.experts.items()}}
    if m.target is not m.base:
        ckpts["models.target"] = m.target
    out: dict[str, Any] = {"version": VERSION, **{k: model_identity(c) for k, c in ckpts.items()}}
    out["models.order"] = list(m.names)
    out["models.target"] = out.get("models.target")
    paths = {k: str(Path(c.path).resolve()) for k, c in ckpts.items()}
    if cfg.models.tokenizer:
        from optimizer.checkpoint import locate

        tok = Path(locate(cfg.models.tokenizer, what="models.tokenizer"))
        out["models.tokenizer"] = {"files": {n: file_digest(tok / n) for n in _SIDE_FILES
                                             if (tok / n).is_file()}}
        paths["models.tokenizer"] = str(tok.resolve())
    out["models.dtype"] = dtype_name(m.dtype)
    out["models.vocab_policy"] = m.vocab_policy
    out["merge.method"] = s.space.method.name
    out["mode.granularity"] = s.space.layout.granularity
    out["merge.search"] = [p.name for p in s.space.params]
    out["merge.bounds"] = {p.name: [p.low, p.high, p.log] for p in s.space.params}
    out["merge.params"] = s.space.pinned
    evaluator = _plain(cfg.evaluator, NEUTRAL_KEYS)
    out["evaluator"] = evaluator
    out["judge"] = _plain(cfg.judge, NEUTRAL_KEYS) if _names(evaluator) & {"mt_bench", "judge"} else None
    out["objective"] = _plain(cfg.objective)
    out["moe"] = s.moe.to_dict() if s.moe is not None else None
    out[PATHS] = paths  # for messages only: never compared
    return json.loads(json.dumps(out, default=str))  # plain JSON, as the storage returns it


def first_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first key (in `current`'s order, then stored-only keys) whose values differ; nested dicts name
    their first differing sub-key (`evaluator.limit`, `models.models.rev.files.model.safetensors`)."""
    for key in [*current, *(k for k in stored if k not in current)]:
        if key == PATHS:
            continue
        a, b = stored.get(key), current.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict) and key not in ("merge.bounds", "merge.params"):
                sub = first_difference(a, b)
                return f"{key}.{sub}" if sub else key
            return key
    return None


def _lookup(doc: dict[str, Any], dotted: str) -> Any:
    """Value at a dotted key produced by `first_difference` (keys may themselves contain dots)."""
    if dotted in doc:
        return doc[dotted]
    for key in sorted(doc, key=len, reverse=True):
        if dotted.startswith(key + ".") and isinstance(doc[key], dict):
            return _lookup(doc[key], dotted[len(key) + 1:])
    return None


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def stored_version(study: optuna.Study) -> dict[str, Any] | None:
    """The study's fingerprint if it has one of this format, else None (made before it; to be replaced)."""
    stored = study.user_attrs.get(ATTR)
    return stored if isinstance(stored, dict) and stored.get("version") == VERSION else None


def check(study: optuna.Study, current: dict[str, Any], where: str) -> bool:
    """Refuse to resume `study` with a configuration whose scores would not be comparable.

    Returns False without checking when the study has no fingerprint of this format (made by an older
    version: the caller checks its stored space instead, and stores a fingerprint on resume).
    """
    stored = stored_version(study)
    if stored is None:
        return False
    key = first_difference(stored, current)
    if key is None:
        return True
    hint = {"models": "the model folders (or their weights) differ from the ones the study was created with",
            "evaluator": "the evaluator scores differently (tasks, splits, limits, metrics)",
            "judge": "another judge would rate differently",
            "objective": "the trial values mean something else",
            "merge": "the search space differs", "mode": "the search space differs",
            "moe": "the MoE recipe differs"}.get(key.split(".")[0], "the study is defined differently")
    model = next((k for k in current.get(PATHS, {}) if key == k or key.startswith(k + ".")), None)
    if model:  # name the folders: a content hash alone does not say which files they are
        then, now = (stored.get(PATHS) or {}).get(model), current[PATHS][model]
        where_models = f"; the study's files were in {then!r}, this run's are in {now!r}" if then else \
            f"; this run's files are in {now!r}"
    else:
        where_models = ""
    raise UserError(f"study {study.study_name!r} in {where} was created with a different {key} "
                    f"(stored: {_short(_lookup(stored, key))}; now: {_short(_lookup(current, key))}"
                    f"{where_models}): "
                    f"{hint}, so "
                    "its scores are not comparable with this run's. Resume it with its original settings, or "
                    "choose a new study_name.")

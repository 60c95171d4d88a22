"""A transformers model on the local device as the judge (e.g. a local Command-R or Qwen instruct)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from optimizer import UserError
from optimizer.dtypes import CONFIG_NAMES, NAMED
from optimizer.eval.judge.chat import render_chat
from optimizer.eval.judge.clients import Completion, JudgeStats
from optimizer.eval.judge.config import JudgeConfig
from optimizer.eval.judge.generate import GenSettings, encode_prompt, generate_counted
from optimizer.zoo.layout import SCHEME as ZOO_SCHEME


def model_path(ref: str) -> str:
    """Where to load the judge from: a `zoo://name` reference becomes its folder (the demo zoo is built on
    first use, as for `models.base`); folders and hub ids are passed to transformers as they are."""
    if ref.startswith(ZOO_SCHEME):
        from optimizer.checkpoint import locate

        return str(locate(ref, what="judge.model"))
    return ref


def check_local_model(cfg: JudgeConfig) -> None:
    """UserError unless `judge.model` is a local model folder, a `zoo://` model or looks like a hub id."""
    if cfg.dtype not in CONFIG_NAMES:
        raise UserError(f"judge.dtype={cfg.dtype!r} is unknown; use one of {', '.join(CONFIG_NAMES)}.")
    p = Path(model_path(cfg.model)).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"judge.model={cfg.model} has no config.json; point it at a transformers model folder.")
        return
    if cfg.model.count("/") != 1 or cfg.model.startswith((".", "/", "~")):
        raise UserError(f"judge.model={cfg.model!r} is neither a local model folder, a demo zoo model "
                        "(zoo://base) nor a hub id (org/name).")


class LocalJudge:
    """Greedy judgments from a local causal LM, generated in batches (no HTTP, no key).

    Args:
        cfg: judge config (model folder or hub id, dtype, batch_size, max_tokens, conv_template).
        device: where to load it (the run's device).
    """

    batched = True

    def __init__(self, cfg: JudgeConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.stats = JudgeStats()
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return f"local:{self.cfg.model}"

    def _load(self) -> None:
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = model_path(self.cfg.model)
            self._tokenizer = AutoTokenizer.from_pretrained(path)
            self._model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if self.cfg.dtype == "auto" else NAMED[self.cfg.dtype])
            self._model.to(self.device).eval()

    def complete_batch(self, requests: list[tuple[str, str]]) -> list[Completion]:
        """Judge a batch of (system, user) prompts; the judge model is loaded on first use."""
        with self._lock:
            self._load()
            tok = self._tokenizer
            texts = [self._render(system, user) for system, user in requests]
            settings = GenSettings(max_new_tokens=self.cfg.max_tokens, batch_size=len(texts))
            replies = generate_counted(self._model, tok, texts, 0.0, [], settings)
            out = [Completion(reply, len(encode_prompt(tok, text)), n_out)
                   for text, (reply, n_out) in zip(texts, replies, strict=True)]
            self.stats.add(requests=len(requests))
            return out

    def _render(self, system: str, user: str) -> str:
        msgs = [{"role": "user", "content": user}]
        if not system:
            return render_chat(self._tokenizer, msgs, self.cfg.conv_template)[0]
        try:
            return render_chat(self._tokenizer, [{"role": "system", "content": system}, *msgs],
                               self.cfg.conv_template)[0]
        except UserError:
            # Templates such as Mistral's reject a system role: fold the judge's instructions into the turn.
            return render_chat(self._tokenizer, [{"role": "user", "content": f"{system}\n\n{user}"}],
                               self.cfg.conv_template)[0]

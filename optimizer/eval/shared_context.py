"""Loglikelihood requests that share a context: the context's forward pass once, then every continuation.

A multiple-choice item asks for the log-likelihood of each choice after the same prompt; lm-eval's HFLM runs
prompt + choice as one row per choice (its `_loglikelihood_tokens` shares work only for one-token choices;
its own TODO asks for "middleware that lumps together requests with the same context"). On the demo zoo the
five kana choices repeat a ~37-token prompt five times: 89% of the tokens scored. Here a batch of contexts
runs once (left-padded, with its attention mask and position ids) into the model's KV cache, the cache rows
are repeated per continuation (`Cache.batch_select_indices`), and the continuations run on top of it:

    logprob(cont | ctx) = log_softmax(logits at ctx's last position)[cont[0]]
                          + sum_j log_softmax(logits of cont[j-1])[cont[j]]

with lm-eval's (logprob, is_greedy) per request, its softmax dtype, and its order. The numbers are lm-eval's
up to float rounding (another matrix shape for the same sums); `SharedContextScorer` checks that on its first
call against `lm._loglikelihood_tokens` on a few requests and, if a model's cache does not behave (an
architecture whose cache cannot be re-indexed, a mismatch), says so once and leaves every request to lm-eval.
Requests whose context is not shared, or that would need lm-eval's left truncation, always go to lm-eval.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

Request = tuple[tuple[str, str], list[int], list[int]]  # lm-eval's token request: (strings, context, continuation)
CHECK_REQUESTS = 8  # compared with lm-eval on the first call
TOLERANCE = 1e-3  # |difference| allowed per request, relative to max(1, |logprob|)


class SharedContextScorer:
    """Scores token requests like `lm._loglikelihood_tokens`, one context pass per distinct shared context.

    Args:
        lm: an lm-eval HFLM (causal backend) around the live model.
        rows: continuation rows per forward pass (default: the LM's batch size).
    """

    def __init__(self, lm: Any, rows: int | None = None):
        self.lm = lm
        bs = getattr(lm, "batch_size", 64)
        self.rows = int(rows or (bs if isinstance(bs, int) and bs > 0 else 64))
        self.enabled: bool | None = None  # None: not checked yet
        self.reason = ""
        self._arg: tuple[Any, str] | None = None  # (model, its forward's cache argument)

    @staticmethod
    def supports(lm: Any) -> bool:
        return getattr(lm, "backend", None) == "causal" and hasattr(lm, "model") and hasattr(lm, "max_length")

    def __call__(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        limit = int(self.lm.max_length) + 1
        for k, (_, ctx, cont) in enumerate(requests):
            if ctx and cont and len(ctx) + len(cont) <= limit:
                groups.setdefault(tuple(ctx), []).append(k)
        shared = [idx for idx in groups.values() if len(idx) > 1]
        if self.enabled is None and shared:
            self._check([requests[k] for idx in shared for k in idx][:CHECK_REQUESTS])
        if not self.enabled:
            shared = []
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        mine = {k for idx in shared for k in idx}
        rest = [k for k in range(len(requests)) if k not in mine]
        if rest:
            for k, r in zip(rest, self.lm._loglikelihood_tokens([requests[k] for k in rest], disable_tqdm=True),
                            strict=True):
                out[k] = r
        if shared:
            for k, r in self._shared(requests, shared).items():
                out[k] = r
        return out  # type: ignore[return-value]

    def _check(self, sample: list[Request]) -> None:
        try:
            groups: dict[tuple[int, ...], list[int]] = {}
            for k, (_, ctx, _) in enumerate(sample):
                groups.setdefault(tuple(ctx), []).append(k)
            got = self._shared(sample, list(groups.values()))
            want = self.lm._loglikelihood_tokens(list(sample), disable_tqdm=True)
        except Exception as e:  # an architecture whose cache cannot be re-indexed, ...
            self.enabled, self.reason = False, f"{type(e).__name__}: {e}"
        else:
            bad = [k for k, (lp, greedy) in enumerate(want)
                   if abs(got[k][0] - lp) > TOLERANCE * max(1.0, abs(lp)) or got[k][1] != greedy]
            self.enabled = not bad
            if bad:
                k = bad[0]
                self.reason = f"request {k}: {got[k]} here vs lm-eval's {want[k]}"
        if not self.enabled:
            log.warning("shared-context scoring is off for this model (%s); every request goes through "
                        "lm-eval's own loglikelihood", self.reason)

    @torch.no_grad()
    def _shared(self, requests: Sequence[Request], groups: list[list[int]]) -> dict[int, tuple[float, bool]]:
        """(logprob, is_greedy) of every request in `groups` (each group: indices sharing one context)."""
        out: dict[int, tuple[float, bool]] = {}
        order = sorted(groups, key=lambda idx: -len(requests[idx[0]][1]))  # similar lengths batch together
        batch: list[list[int]] = []
        rows = 0
        for idx in order:
            if batch and rows + len(idx) > self.rows:
                out.update(self._batch(requests, batch))
                batch, rows = [], 0
            batch.append(idx)
            rows += len(idx)
        if batch:
            out.update(self._batch(requests, batch))
        return out

    def _cache_arg(self, model: Any) -> str:
        """The forward argument that takes a cache: `cache` (transformers >= 5.2x) or `past_key_values`
        (looked up once per model, not per batch)."""
        import inspect

        if self._arg is None or self._arg[0] is not model:
            name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            self._arg = (model, name)
        return self._arg[1]

    def _autocast(self) -> Any:
        """The LM's mixed precision, as its `_model_call` applies it."""
        dtype = getattr(self.lm, "mixed_precision_dtype", None)
        return torch.autocast(device_type=self.lm.device.type, dtype=dtype, enabled=dtype is not None)

    def _batch(self, requests: Sequence[Request], groups: list[list[int]]) -> dict[int, tuple[float, bool]]:
        lm = self.lm
        model, device = lm.model, lm.device
        dtype = getattr(lm, "softmax_dtype", None)
        pad = 0
        ctxs = [requests[idx[0]][1] for idx in groups]
        width = max(len(c) for c in ctxs)
        ids = torch.full((len(ctxs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ctxs), width), dtype=torch.long)
        for g, c in enumerate(ctxs):  # left padding: every context ends at the last column
            ids[g, width - len(c):] = torch.tensor(c, dtype=torch.long)
            mask[g, width - len(c):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        with self._autocast():
            first = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        last = torch.log_softmax(first.logits[:, -1, :], dim=-1, dtype=dtype)  # predicts cont[0]
        cache = getattr(first, "cache", None) or first.past_key_values

        members = [(g, k) for g, idx in enumerate(groups) for k in idx]
        conts = [requests[k][2] for _, k in members]
        owner = torch.tensor([g for g, _ in members], dtype=torch.long, device=device)
        rest = max(len(c) for c in conts) - 1
        later = None
        if rest > 0:  # continuation tokens after the first, on top of the repeated context cache
            cache.batch_select_indices(owner)
            cids = torch.full((len(conts), rest), pad, dtype=torch.long)
            cmask = torch.zeros((len(conts), rest), dtype=torch.long)
            for r, c in enumerate(conts):
                if len(c) > 1:
                    cids[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                    cmask[r, : len(c) - 1] = 1
            cids, cmask = cids.to(device), cmask.to(device)
            lengths = mask.sum(-1)[owner]
            cpos = lengths.unsqueeze(-1) + torch.arange(rest, device=device).unsqueeze(0)
            with self._autocast():
                second = model(input_ids=cids, attention_mask=torch.cat([mask[owner], cmask], dim=-1),
                               position_ids=cpos, use_cache=True, **{self._cache_arg(model): cache})
            later = torch.log_softmax(second.logits, dim=-1, dtype=dtype)
        out: dict[int, tuple[float, bool]] = {}
        for r, ((g, k), c) in enumerate(zip(members, conts, strict=True)):
            rows = last[g: g + 1]
            if len(c) > 1:
                rows = torch.cat([rows, later[r, : len(c) - 1]], dim=0)  # type: ignore[index]
            target = torch.tensor(c, dtype=torch.long, device=device)
            greedy = bool((rows.argmax(dim=-1) == target).all())
            out[k] = (float(rows.gather(1, target.unsqueeze(-1)).sum()), greedy)
        return out

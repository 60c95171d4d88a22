"""Gold answers of the search split, read through lm-eval's Task API, and batched log-likelihoods of them.

The gradient refiner and fast search-signal checks need (context, continuation) pairs with the right answer
marked. They come from the evaluator's own loaded search-split tasks (`task.fewshot_context`,
`task.construct_requests`, `task.doc_to_target`), so the requests are the ones lm-eval scores; the held-out
split is refused. Tokenisation follows lm-eval's `TemplateLM._encode_pair` for causal models (trailing
context spaces move to the continuation, the continuation is what the whole string adds to the context).

Two kinds of item:
- `loglikelihood` tasks: one request; acc = the continuation is the greedy decoding (lm-eval's `is_greedy`).
- `multiple_choice` tasks: one request per choice; acc = the gold choice has the highest log-likelihood.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from optimizer import UserError
from optimizer.eval.base import SEARCH

KINDS = ("loglikelihood", "multiple_choice")


@dataclass(frozen=True)
class GoldItem:
    """One scored item: its requests (one, or one per choice) and which request is the right answer."""

    task: str
    doc_id: int
    requests: tuple[tuple[str, str], ...]  # (context, continuation) as lm-eval builds them
    gold: int
    kind: str


@dataclass
class GoldSet:
    """Tokenised requests of many items; `item_of[r]` is the item a request belongs to."""

    items: list[GoldItem]
    tokens: list[list[int]]  # context + continuation token ids per request
    n_cont: list[int]  # continuation length per request
    item_of: list[int]
    weights: dict[str, float]

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(i.task for i in self.items))

    def subset(self, item_indices: Sequence[int]) -> GoldSet:
        """The same requests for a subset of items (e.g. a minibatch), in the given order."""
        keep = list(item_indices)
        pos = {old: new for new, old in enumerate(keep)}
        req = [r for r, i in enumerate(self.item_of) if i in pos]
        return GoldSet([self.items[i] for i in keep], [self.tokens[r] for r in req],
                       [self.n_cont[r] for r in req], [pos[self.item_of[r]] for r in req], self.weights)


def items_from_tasks(tasks: Mapping[str, Any], indices: Mapping[str, Sequence[int]],
                     num_fewshot: Mapping[str, int] | None = None) -> list[GoldItem]:
    """Gold items of lm-eval Task objects (`name -> Task`), for the doc ids in `indices` (`name -> ids`)."""
    out = []
    for name, ids in indices.items():
        task = tasks[name]
        kind = task.OUTPUT_TYPE
        if kind not in KINDS:
            raise UserError(f"task {name!r} has output_type {kind!r}; gold answers exist only for "
                            f"{' and '.join(KINDS)} tasks (use search.refine.enabled=false for it).")
        docs = task.eval_docs
        shots = (num_fewshot or {}).get(name) or 0
        for i in ids:
            doc = docs[i]
            ctx = task.fewshot_context(doc, shots)
            reqs = task.construct_requests(doc=doc, ctx=ctx, metadata=(name, i, 1))
            reqs = reqs if isinstance(reqs, list) else [reqs]
            pairs = tuple((r.arguments[0], r.arguments[1]) for r in reqs)
            if kind == "multiple_choice":
                target = task.doc_to_target(doc)
                gold = target if isinstance(target, int) else task.doc_to_choice(doc).index(target)
            else:
                gold = 0
            out.append(GoldItem(name, int(i), pairs, int(gold), kind))
    return out


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval's causal `_encode_pair` makes them."""
    if not context:
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def build_gold(items: Sequence[GoldItem], tokenizer: Any, weights: Mapping[str, float],
               max_length: int | None = None) -> GoldSet:
    tokens, n_cont, item_of = [], [], []
    for k, item in enumerate(items):
        for ctx, cont in item.requests:
            c, x = encode_pair(tokenizer, ctx, cont)
            seq = (c + x)
            if max_length:
                seq = seq[-(max_length + 1):]  # lm-eval keeps the last max_length+1 tokens too
            tokens.append(seq)
            n_cont.append(len(x))
            item_of.append(k)
    return GoldSet(list(items), tokens, n_cont, item_of, dict(weights))


def evaluator_gold(evaluator: Any, tokenizer: Any, split: str = SEARCH, limit: int | None = None) -> GoldSet:
    """The gold set of an lm-eval evaluator's search split (its configured tasks, items and weights).

    Args:
        evaluator: an `LmEvalEvaluator` (validated, so its tasks are loaded).
        tokenizer: the run's tokenizer.
        split: must be "search": gold answers of the held-out split are never read.
        limit: at most this many items per task (the first ones of the evaluator's fixed item order).
    """
    if split != SEARCH:
        raise ValueError(f"gold answers are read from the search split only, not {split!r}")
    if getattr(evaluator, "name", None) != "lm_eval":
        raise UserError(f"the gradient refiner needs gold answers from an lm-eval evaluator; evaluator "
                        f"{getattr(evaluator, 'name', evaluator)!r} has none (set search.refine.enabled=false).")
    tasks = evaluator.tasks_for(split)
    indices = evaluator.item_indices(split)
    if limit:
        indices = {k: v[:limit] for k, v in indices.items()}
    shots = {t.name: t.num_fewshot for t in evaluator.cfg.tasks if t.num_fewshot}
    return build_gold(items_from_tasks(tasks, indices, shots), tokenizer, evaluator.weights,
                      evaluator.cfg.max_length)


class RequestScores(NamedTuple):
    """Per request: the continuation's summed log-prob, whether it is the greedy decoding (lm-eval's
    `is_greedy`), and its smallest per-token gap: gold token log-prob minus the best other token's, over
    the continuation (> 0 at every token iff it is the greedy decoding, ties aside)."""

    logprob: torch.Tensor
    greedy: torch.Tensor
    gap: torch.Tensor


def request_logprobs(model: Any, gold: GoldSet, batch_size: int = 256, pad_id: int = 0,
                     device: torch.device | None = None) -> RequestScores:
    """Log-likelihoods of every request (see RequestScores); differentiable when grad is enabled.

    Args:
        model: a causal LM, or a callable `(input_ids, attention_mask) -> logits` (e.g. a functional call
            with other weights).
        gold: the requests.
        device: where the callable's inputs go (a model's own device otherwise).
    """
    if isinstance(model, torch.nn.Module):
        device = next(model.parameters()).device

        def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids, attention_mask=mask).logits
    else:
        forward, device = model, device or torch.device("cpu")
    lps, greedy, gaps = [], [], []
    order = sorted(range(len(gold.tokens)), key=lambda r: -len(gold.tokens[r]))  # similar lengths per batch
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        seqs = [gold.tokens[r][:-1] for r in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        target = torch.full((len(batch), width), -1, dtype=torch.long)
        for j, r in enumerate(batch):
            seq = gold.tokens[r]
            n, c = len(seq) - 1, gold.n_cont[r]
            ids[j, :n] = torch.tensor(seq[:-1])
            mask[j, :n] = 1
            target[j, n - c:n] = torch.tensor(seq[-c:])
        ids, mask, target = ids.to(device), mask.to(device), target.to(device)
        logits = forward(ids, mask)
        scored = target >= 0
        row = torch.arange(len(batch), device=device).unsqueeze(-1).expand_as(target)[scored]
        want = target[scored]
        # only the continuation positions' logits are kept (and, with grad, saved for backward): not the
        # batch x length x vocab tensor, which at a 32k+ vocab dominated the refiner's memory
        sel = logits[scored]
        hit = sel.argmax(-1) == want
        del logits
        logp = torch.log_softmax(sel.float(), dim=-1)
        tok = logp.gather(-1, want.unsqueeze(-1)).squeeze(-1)
        other = logp.scatter(-1, want.unsqueeze(-1), float("-inf")).max(-1).values
        n = len(batch)
        lps.append(torch.zeros(n, dtype=tok.dtype, device=device).index_add(0, row, tok))
        greedy.append(_all_per_row(row, hit, n))
        gaps.append(torch.full((n,), float("inf"), dtype=tok.dtype, device=device).scatter_reduce(
            0, row, tok - other, reduce="amin"))
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    inv = inv.to(device)
    return RequestScores(torch.cat(lps)[inv], torch.cat(greedy)[inv], torch.cat(gaps)[inv])


def _all_per_row(row: torch.Tensor, hit: torch.Tensor, n: int) -> torch.Tensor:
    """Per row, whether every one of its entries in `hit` is True."""
    misses = torch.zeros(n, dtype=torch.long, device=hit.device).index_add(0, row, (~hit).long())
    return misses == 0


def _per_item(gold: GoldSet, lp: torch.Tensor) -> list[torch.Tensor]:
    groups: list[list[int]] = [[] for _ in gold.items]
    for r, i in enumerate(gold.item_of):
        groups[i].append(r)
    return [lp[torch.tensor(g, device=lp.device)] for g in groups]


def item_scores(gold: GoldSet, lp: torch.Tensor, greedy: torch.Tensor, gap: torch.Tensor | None = None,
                temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Per item: `acc` (as lm-eval scores it), `margin` (gold log-lik minus the best other choice; for a
    single-request item the gold log-lik itself), `nll` (cross-entropy of the gold answer: over the
    choices for multiple choice, the continuation's negative log-likelihood otherwise) and `prob` (the
    gold choice's softmax share, or the continuation's geometric-mean token probability: the evaluator's
    `prob` search metric). With `gap` (RequestScores.gap) also `soft_acc`: a differentiable accuracy,
    sigmoid(gap / temperature) of the gold choice's margin over the best other choice, or of the
    continuation's smallest per-token gap (greedy decoding = every gap > 0)."""
    acc, margin, nll, prob, soft = [], [], [], [], []
    for item, lps, r0 in zip(gold.items, _per_item(gold, lp), _first_requests(gold), strict=True):
        if item.kind == "multiple_choice":
            g = lps[item.gold]
            others = torch.cat([lps[:item.gold], lps[item.gold + 1:]])
            acc.append((torch.argmax(lps) == item.gold).float())  # first maximum wins ties, as np.argmax
            margin.append(g - others.max() if len(others) else g)
            share = torch.log_softmax(lps, 0)[item.gold]
            nll.append(-share)
            prob.append(share.exp())
            soft.append(torch.sigmoid(margin[-1] / temperature))
        else:
            acc.append(greedy[r0].float())
            margin.append(lps[0])
            nll.append(-lps[0])
            prob.append((lps[0] / max(gold.n_cont[r0], 1)).exp())
            if gap is not None:
                soft.append(torch.sigmoid(gap[r0] / temperature))
    out = {"acc": torch.stack(acc), "margin": torch.stack(margin), "nll": torch.stack(nll),
           "prob": torch.stack(prob)}
    if gap is not None:
        out["soft_acc"] = torch.stack(soft)
    return out


def _first_requests(gold: GoldSet) -> list[int]:
    first: dict[int, int] = {}
    for r, i in enumerate(gold.item_of):
        first.setdefault(i, r)
    return [first[i] for i in range(len(gold.items))]


def task_means(gold: GoldSet, per_item: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for t in gold.tasks:
        idx = torch.tensor([k for k, i in enumerate(gold.items) if i.task == t], device=per_item.device)
        out[t] = per_item[idx].mean()
    return out


def weighted(gold: GoldSet, per_task: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The objective's weighted mean over tasks (the evaluator's task weights)."""
    total = sum(gold.weights.get(t, 1.0) for t in per_task)
    return sum(gold.weights.get(t, 1.0) * v for t, v in per_task.items()) / total

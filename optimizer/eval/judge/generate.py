"""Multi-turn answer generation from the live (merged) model: batched, greedy unless asked, stop strings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from optimizer.eval.judge.bench import MAX_TURNS, Question
from optimizer.eval.judge.chat import render_chat
from optimizer.eval.judge.config import GenerationFields

log = logging.getLogger(__name__)


@dataclass
class GenSettings(GenerationFields):
    """How answers are generated (see MtBenchConfig for the meaning of each field), plus the sampling seed."""

    seed: int = 0


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered chat prompt (BOS added only when the template lacks it but the model wants it)."""
    # Chat templates usually write BOS themselves; add it only where the template did not but the
    # tokenizer's plain encoding would (a Llama-family model prompted with a BOS-less named template).
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if bos and bos_id is not None and not text.startswith(bos):
        plain = tokenizer("a")["input_ids"]
        if plain and plain[0] == bos_id:
            ids = [bos_id, *ids]
    return ids


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


_TRUNCATION_WARNED: set[tuple[int, int]] = set()


def fit_context(model: Any, seqs: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], int]:
    """Prompts and a new-token budget that fit the model's context (tiny demo models have 256 positions).

    The answer gets at most half the context; a prompt longer than the rest keeps its last tokens (the
    latest turn matters most), with a warning (once per context size and process: every trial answers
    the same questions, so it would repeat for each batch of each trial).
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return seqs, max_new_tokens
    new = max(min(max_new_tokens, limit // 2), 1)
    keep = limit - new
    if any(len(s) > keep for s in seqs):
        if (limit, new) not in _TRUNCATION_WARNED:
            _TRUNCATION_WARNED.add((limit, new))
            log.warning("MT-Bench prompt of %d tokens exceeds the model's context (%d) minus the answer (%d): "
                        "keeping its last tokens (said once; longer prompts are cut the same way)",
                        max(len(s) for s in seqs), limit, new)
        seqs = [s[-keep:] for s in seqs]
    return seqs, new


def cut_at_stop(text: str, stops: list[str] | tuple[str, ...]) -> str:
    """Text before the earliest stop string (generation keeps the stop string itself), stripped."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def generate_batch(model: Any, tokenizer: Any, texts: list[str], temperature: float, stops: list[str],
                   settings: GenSettings) -> list[str]:
    """Continue each prompt text once (left-padded batch); returns the decoded continuations cut at `stops`."""
    return [text for text, _ in generate_counted(model, tokenizer, texts, temperature, stops, settings)]


@torch.inference_mode()
def generate_counted(model: Any, tokenizer: Any, texts: list[str], temperature: float, stops: list[str],
                     settings: GenSettings) -> list[tuple[str, int]]:
    """As generate_batch, with the number of tokens each continuation took (up to and with its EOS)."""
    device = next(model.parameters()).device
    seqs, new_tokens = fit_context(model, [encode_prompt(tokenizer, t) for t in texts], settings.max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_ids(model, tokenizer)[0]
    width = max(len(s) for s in seqs)
    # Left padding by hand, so the shared tokenizer's padding_side is never touched.
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    gc = GenerationConfig(max_new_tokens=new_tokens, do_sample=temperature > 0,
                          temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                          pad_token_id=pad, eos_token_id=_eos_ids(model, tokenizer),
                          stop_strings=stops or None)
    out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gc,
                         tokenizer=tokenizer if stops else None)
    eos = set(gc.eos_token_id)
    results = []
    for row in out[:, width:].tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))  # what follows EOS is padding
        results.append((cut_at_stop(tokenizer.decode(row[:n], skip_special_tokens=True), stops), n))
    return results


def _temperature(q: Question, settings: GenSettings) -> float:
    return settings.category_temperature.get(q.category, settings.temperature)


def generate_answers(model: Any, tokenizer: Any, questions: list[Question], settings: GenSettings) -> list[list[str]]:
    """Answer every turn of every question; turn 2 sees the model's own turn-1 answer (as in MT-Bench).

    Questions are batched per turn and per temperature, longest prompts together to waste little padding.
    Sampling (temperature > 0) is seeded from `settings.seed` and the turn, without touching global RNG state.

    Args:
        model: the live causal LM (its device is used).
        tokenizer: its tokenizer (left padding is done here; the tokenizer is not modified).
        questions: the questions to answer.
        settings: generation settings.
    Returns:
        answers[i][t] for question i, turn t.
    """
    convs: list[list[dict[str, str]]] = [
        [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else [] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    was_training = model.training
    model.eval()
    try:
        for turn in range(MAX_TURNS):
            active = [i for i, q in enumerate(questions) if len(q.turns) > turn]
            prompts, stops = {}, {}
            for i in active:
                convs[i].append({"role": "user", "content": questions[i].turns[turn]})
                prompts[i], extra = render_chat(tokenizer, convs[i], settings.conv_template)
                stops[i] = list(dict.fromkeys([*settings.stop, *extra]))
            for i, text in _run_turn(model, tokenizer, questions, active, prompts, stops, settings, turn):
                answers[i].append(text)
                convs[i].append({"role": "assistant", "content": text})
    finally:
        model.train(was_training)
    return answers


def _run_turn(model, tokenizer, questions, active, prompts, stops, settings, turn):
    groups: dict[tuple, list[int]] = {}
    for i in active:
        groups.setdefault((_temperature(questions[i], settings), tuple(stops[i])), []).append(i)
    device = next(model.parameters()).device
    for (temp, stop), idx in sorted(groups.items()):
        idx = sorted(idx, key=lambda i: -len(prompts[i]))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(settings.seed * 1000 + turn)
            for b in range(0, len(idx), settings.batch_size):
                chunk = idx[b:b + settings.batch_size]
                texts = generate_batch(model, tokenizer, [prompts[i] for i in chunk], temp, list(stop), settings)
                yield from zip(chunk, texts, strict=True)

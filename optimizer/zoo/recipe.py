"""The zoo recipe: how the base is pretrained and each expert fine-tuned (all numbers in one place).

Changing any number here changes the models: bump `RECIPE_VERSION` in `optimizer/zoo/__init__.py`.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .skills import SKILLS, general_text, train_items
from .train import Source, batches, encode_item, encode_text, make_model, train


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of the zoo.

    Args:
        seed: master seed (data, init, batch order).
        n_eval: items per evaluation split and skill.
        base_batch: examples per pretraining step of add, rev, kana (answer-only loss) and general text;
            ~70/30 skills/text. add and rev get more: they need many examples and theirs are the cheapest.
            The base sees mostly the easy part of add and rev (see `skills.BASE_HARD_SHARE`).
        base_steps, base_lr: pretraining of the base.
        expert_batch: examples per fine-tuning step.
        expert_steps, expert_lr: single-skill fine-tunes from the base (short, so the task vectors stay
            close to the base and merge; experts trained from an unrelated base do not merge at all).
        mlp_expert_lr: the MLP-only fine-tunes (`MOE_EXPERTS`: same data and steps, only `mlp.*` trained);
            fewer trainable weights need a higher rate to learn as much.
    """

    seed: int = 0
    n_eval: int = 150
    base_batch: tuple[int, int, int, int] = (16, 12, 6, 14)
    base_steps: int = 800
    base_lr: float = 3e-3
    expert_batch: int = 32
    expert_steps: int = 150
    expert_lr: float = 1e-3
    mlp_expert_lr: float = 3e-3


RECIPE = Recipe()
Progress = Callable[[int, float], None]


def _skill_stream(tok, skill: str, recipe: Recipe, exclude: set[str], stream: str) -> Iterator:
    return (encode_item(tok, item) for item in train_items(skill, recipe.seed, exclude, stream))


def _text_stream(tok, recipe: Recipe) -> Iterator:
    rng = random.Random(f"text-{recipe.seed}")
    while True:
        yield encode_text(tok, general_text(rng, recipe.seed))


def pretrain_base(tok, exclude: set[str], recipe: Recipe = RECIPE, on_step: Progress | None = None):
    """Pretrain the base on skill examples (all three skills) mixed with general text.

    Args:
        tok: zoo tokenizer.
        exclude: keys of evaluation items, never trained on.
        recipe: hyper-parameters.
        on_step: progress callback.
    """
    model = make_model(len(tok), recipe.seed, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                       pad_id=tok.pad_token_id)
    *skill_counts, text_count = recipe.base_batch
    sources = [Source(n, _skill_stream(tok, s, recipe, exclude, "base"))
               for s, n in zip(SKILLS, skill_counts, strict=True)]
    sources.append(Source(text_count, _text_stream(tok, recipe)))
    data = batches(sources, tok.pad_token_id)
    train(model, data, steps=recipe.base_steps, lr=recipe.base_lr, warmup=recipe.base_steps // 10,
          on_step=on_step)
    return model


def finetune_expert(base, tok, skill: str, exclude: set[str], recipe: Recipe = RECIPE,
                    on_step: Progress | None = None, *, mlp_only: bool = False):
    """A copy of `base` fine-tuned on `skill` alone (answer-only loss).

    Args:
        base: the pretrained base (left untouched).
        tok: zoo tokenizer.
        skill: "add", "rev" or "kana".
        exclude: keys of evaluation items.
        recipe: hyper-parameters.
        on_step: progress callback.
        mlp_only: train only `mlp.*` (at `recipe.mlp_expert_lr`); every other tensor stays the base's, bit
            for bit. The data are the full expert's (a fresh generator of the same seeded stream).
    """
    model = copy.deepcopy(base)
    if mlp_only:
        for name, p in model.named_parameters():
            p.requires_grad_(".mlp." in name)
    stream = _skill_stream(tok, skill, recipe, exclude, skill)
    data = batches([Source(recipe.expert_batch, stream)], tok.pad_token_id)
    lr = recipe.mlp_expert_lr if mlp_only else recipe.expert_lr
    train(model, data, steps=recipe.expert_steps, lr=lr, warmup=0, on_step=on_step)
    model.requires_grad_(True)
    return model

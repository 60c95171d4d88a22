"""Seeded generators for the zoo's three skills and its general text.

Every generator takes a `random.Random`, so the whole zoo is a pure function of the recipe seed. An `Item`
is one question with its answer; `key` identifies it so evaluation splits and training data stay disjoint.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

SKILLS = ("add", "rev", "kana")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Basic hiragana; dakuten forms only appear inside the fixed words below.
HIRAGANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
CATEGORIES = ("どうぶつ", "たべもの", "のりもの", "どうぐ", "ばしょ")
WORDS_PER_CATEGORY = 30
N_CHOICES = 5
REV_LENGTHS = (3, 7)  # min, max letters of evaluation and expert items
# The base sees mostly the easy part of each algorithmic skill (short strings, additions without a carry),
# so its partial competence is a property of its data. Left to chance (whether the base happens to "get"
# reversal within its steps) it swung from 0.1 to 0.95 between near-identical recipes.
REV_BASE_LENGTHS = (3, 5)
# Share of the base's add/rev items drawn from the full skill: some, so the experts sharpen a skill the base
# half has (that merges) rather than build one from nothing (that did not survive merging at all).
BASE_HARD_SHARE = 0.25


@dataclass(frozen=True)
class Item:
    """One skill question.

    Args:
        key: identity of the question (splits and training data never share a key).
        prompt: text the model is conditioned on; the answer starts right after it (no delimiter).
        answer: the correct continuation.
        choices: multiple-choice options (kana only); `answer == choices[label]`.
        label: index of the correct choice, -1 when not multiple choice.
    """

    key: str
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    label: int = -1

    def to_doc(self) -> dict:
        """The row written to `data/<task>/<split>.jsonl` and read by the lm-eval tasks."""
        doc = {"key": self.key, "prompt": self.prompt, "answer": self.answer}
        if self.choices:
            doc.update(choices=list(self.choices), label=self.label)
        return doc


def make_add(rng: random.Random, *, carry: bool = True) -> Item:
    """Two-digit addition, `12+35=` -> `47`.

    Args:
        rng: random source.
        carry: False draws only problems whose ones digits do not carry (what the base is taught).
    """
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if carry or a % 10 + b % 10 < 10:
            break
    prompt = f"{a}+{b}="
    return Item(prompt, prompt, str(a + b))


def make_rev(rng: random.Random, *, lengths: tuple[int, int] | None = None) -> Item:
    """String reversal, `rev:abcde>` -> `edcba`.

    Args:
        rng: random source.
        lengths: (min, max) letters; default `REV_LENGTHS`.
    """
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(*(lengths or REV_LENGTHS))))
    prompt = f"rev:{word}>"
    return Item(prompt, prompt, word[::-1])


@functools.cache
def kana_lexicon(seed: int) -> dict[str, str]:
    """The kana world: word -> category, a fixed set of facts the kana skill asks about.

    Args:
        seed: recipe seed; the same seed always gives the same facts.

    Cached: callers must not mutate the returned dict.
    """
    rng = random.Random(f"lexicon-{seed}")
    taken, lexicon = set(CATEGORIES), {}
    for category in CATEGORIES:
        for _ in range(WORDS_PER_CATEGORY):
            word = _new_word(rng, taken)
            taken.add(word)
            lexicon[word] = category
    return lexicon


def _new_word(rng: random.Random, taken: set[str]) -> str:
    while True:
        word = rng.choice(HIRAGANA[:-1]) + "".join(rng.choice(HIRAGANA) for _ in range(rng.randint(1, 2)))
        if word not in taken:
            return word


def make_kana(rng: random.Random, lexicon: dict[str, str]) -> Item:
    """A JCommonsenseQA-style question over the kana world: question, 5 choices, answer = a choice.

    Two forms: "which word is a <category>?" (choices are words) and "what is <word>?" (choices are
    the categories).
    """
    if rng.random() < 0.5:
        category = rng.choice(CATEGORIES)
        right = rng.choice(sorted(w for w, c in lexicon.items() if c == category))
        wrong = rng.sample(sorted(w for w, c in lexicon.items() if c != category), N_CHOICES - 1)
        question = f"{category} は どれ?"
    else:
        right = rng.choice(sorted(lexicon))
        question = f"{right} は なに?"
        right = lexicon[right]
        wrong = [c for c in CATEGORIES if c != right]
    choices = [right, *wrong]
    rng.shuffle(choices)
    prompt = f"もんだい:{question}\nせんたくし:{','.join(choices)}\nこたえ:"
    return Item(prompt, prompt, right, tuple(choices), choices.index(right))


def generator(skill: str, seed: int, *, base: bool = False) -> Callable[[random.Random], Item]:
    """The item generator of `skill` ("add", "rev" or "kana") for recipe `seed`.

    Args:
        skill: "add", "rev" or "kana".
        seed: recipe seed.
        base: the restricted version the base is pretrained on.
    """
    if skill == "add":
        return lambda rng: make_add(rng, carry=not base or rng.random() < BASE_HARD_SHARE)
    if skill == "rev":
        return lambda rng: make_rev(
            rng, lengths=REV_BASE_LENGTHS if base and rng.random() >= BASE_HARD_SHARE else REV_LENGTHS
        )
    if skill == "kana":
        lexicon = kana_lexicon(seed)
        return lambda rng: make_kana(rng, lexicon)
    raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS}")


def eval_splits(skill: str, seed: int, n: int = 150) -> dict[str, list[Item]]:
    """Disjoint `search` and `heldout` item lists of `n` items each.

    Args:
        skill: "add", "rev" or "kana".
        seed: recipe seed.
        n: items per split.
    """
    make, rng = generator(skill, seed), random.Random(f"eval-{skill}-{seed}")
    items: dict[str, Item] = {}
    while len(items) < 2 * n:
        item = make(rng)
        items.setdefault(item.key, item)
    ordered = list(items.values())
    return {"search": ordered[:n], "heldout": ordered[n:]}


def train_items(skill: str, seed: int, exclude: set[str], stream: str = "base") -> Iterator[Item]:
    """Endless training items of `skill`, never one whose key is in `exclude` (the evaluation items).

    Args:
        skill: "add", "rev" or "kana".
        seed: recipe seed.
        exclude: keys never to yield.
        stream: name of the stream, so the base and an expert draw different items; "base" also
            restricts the items to the base's part of the skill.
    """
    make = generator(skill, seed, base=stream == "base")
    rng = random.Random(f"train-{skill}-{stream}-{seed}")
    while True:
        item = make(rng)
        if item.key not in exclude:
            yield item


_SUBJECTS = ("the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "we", "they")
_VERBS = ("sees", "likes", "finds", "takes", "makes", "opens", "wants", "moves")
_OBJECTS = ("a red box", "the green door", "some bread", "a long road", "the blue sky", "an apple", "it")
_KANA_VERBS = ("みる", "たべる", "つかう", "いく", "すき")


def general_text(rng: random.Random, seed: int) -> str:
    """One line of general text: simple English or kana sentences (teaches the tokens, not the skills)."""
    if rng.random() < 0.5:
        return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}.".capitalize()
    words = sorted(kana_lexicon(seed))
    return "。".join(f"{rng.choice(words)} を {rng.choice(_KANA_VERBS)}" for _ in range(rng.randint(1, 3))) + "。"

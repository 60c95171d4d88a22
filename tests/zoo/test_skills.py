"""Skill data: seeded, well-formed, splits disjoint from each other and from training data."""

from __future__ import annotations

import itertools
import random

import pytest

from optimizer.zoo import skills


@pytest.mark.parametrize("skill", skills.SKILLS)
def test_splits_deterministic_and_disjoint(skill):
    a, b = skills.eval_splits(skill, seed=0, n=150), skills.eval_splits(skill, seed=0, n=150)
    assert a == b
    search, heldout = ({i.key for i in a[s]} for s in ("search", "heldout"))
    assert len(search) == len(heldout) == 150
    assert not search & heldout
    assert skills.eval_splits(skill, seed=1, n=150) != a


@pytest.mark.parametrize("skill", skills.SKILLS)
def test_training_never_sees_eval_items(skill):
    splits = skills.eval_splits(skill, seed=0)
    exclude = {i.key for items in splits.values() for i in items}
    train = list(itertools.islice(skills.train_items(skill, 0, exclude), 3000))
    assert not {i.key for i in train} & exclude
    assert len({i.key for i in train}) > 100
    again = list(itertools.islice(skills.train_items(skill, 0, exclude), 50))
    assert again == train[:50]


def test_add_and_rev_answers():
    for item in (skills.make_add(random.Random(i)) for i in range(200)):
        a, b = item.prompt[:-1].split("+")
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99 and int(item.answer) == int(a) + int(b)
    for item in (skills.make_rev(random.Random(i)) for i in range(200)):
        assert item.prompt.startswith("rev:") and item.prompt.endswith(">")
        assert item.answer == item.prompt[4:-1][::-1]


def test_kana_questions_follow_the_lexicon():
    lexicon = skills.kana_lexicon(0)
    assert lexicon == skills.kana_lexicon(0) and lexicon != skills.kana_lexicon(1)
    assert len(lexicon) == len(skills.CATEGORIES) * skills.WORDS_PER_CATEGORY
    for item in (skills.make_kana(random.Random(i), lexicon) for i in range(300)):
        assert len(item.choices) == len(set(item.choices)) == skills.N_CHOICES
        assert item.choices[item.label] == item.answer
        assert item.prompt.endswith("こたえ:") and ",".join(item.choices) in item.prompt
        subject = item.prompt.split(":")[1].split(" ")[0]
        if subject in skills.CATEGORIES:  # "which word is a <category>?"
            assert [lexicon.get(c) == subject for c in item.choices].count(True) == 1
            assert lexicon[item.answer] == subject
        else:  # "what is <word>?"
            assert item.answer == lexicon[subject]


def test_docs_have_the_task_fields():
    item = skills.eval_splits("kana", 0, n=1)["search"][0]
    assert set(item.to_doc()) == {"key", "prompt", "answer", "choices", "label"}
    assert set(skills.eval_splits("add", 0, n=1)["search"][0].to_doc()) == {"key", "prompt", "answer"}


def _share(items, predicate) -> float:
    items = list(items)
    return sum(map(predicate, items)) / len(items)


def test_base_sees_mostly_the_easy_part_of_add_and_rev():
    def carry(item):
        return int(item.prompt[1]) + int(item.prompt[4]) >= 10

    def long(item):
        return len(item.answer) > skills.REV_BASE_LENGTHS[1]

    def stream(skill, name):
        return itertools.islice(skills.train_items(skill, 0, set(), name), 2000)

    hard = skills.BASE_HARD_SHARE
    assert _share(stream("add", "base"), carry) == pytest.approx(0.45 * hard, abs=0.03)
    assert _share(stream("add", "add"), carry) == pytest.approx(0.45, abs=0.04)
    assert _share(stream("rev", "base"), long) == pytest.approx(0.4 * hard, abs=0.03)
    assert _share(stream("rev", "rev"), long) == pytest.approx(0.4, abs=0.04)

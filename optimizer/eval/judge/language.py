"""Deterministic language check by writing system, for the answer-language penalty.

A script, not a statistical language model: exact, fast, dependency-free, and good at the question that
matters when merging a Japanese model with English ones ("did it answer in Japanese?"). It cannot tell
English from French (both Latin); the penalty compares scripts, never languages within a script.
"""

from __future__ import annotations

import re

# (first, last code point, script); letters outside these ranges count as "other".
_RANGES = [
    (0x0041, 0x024F, "latin"), (0x1E00, 0x1EFF, "latin"), (0xFF21, 0xFF5A, "latin"),
    (0x0370, 0x03FF, "greek"), (0x0400, 0x052F, "cyrillic"), (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"), (0x0900, 0x097F, "devanagari"), (0x0E00, 0x0E7F, "thai"),
    (0x1100, 0x11FF, "hangul"), (0x3130, 0x318F, "hangul"), (0xAC00, 0xD7AF, "hangul"),
    (0x3040, 0x30FF, "kana"), (0x31F0, 0x31FF, "kana"), (0xFF66, 0xFF9F, "kana"),
    (0x3400, 0x4DBF, "han"), (0x4E00, 0x9FFF, "han"), (0xF900, 0xFAFF, "han"),
]
# A CJK character carries about a word; weighting it keeps a Japanese answer with a few English terms
# (API names, "Python") Japanese.
_WEIGHT = {"han": 3.0, "kana": 3.0, "hangul": 3.0}
_LANG_SCRIPT = {"ja": "ja", "zh": "zh", "ko": "ko", "ru": "cyrillic", "uk": "cyrillic", "bg": "cyrillic",
                "sr": "cyrillic", "el": "greek", "he": "hebrew", "ar": "arabic", "fa": "arabic",
                "hi": "devanagari", "th": "thai"}
_CODE = re.compile(r"```.*?(```|$)|`[^`\n]*`|https?://\S+", re.DOTALL)
MIN_LETTERS = 3  # fewer letters than this and the text has no language to speak of


def _script_of(ch: str) -> str:
    cp = ord(ch)
    for lo, hi, name in _RANGES:
        if lo <= cp <= hi:
            return name
    return "other"


def detect_script(text: str) -> str:
    """The dominant writing system of `text`: ja, zh, ko, latin, cyrillic, ... or "unknown".

    Code blocks, inline code and URLs are ignored (they are Latin in every language). Han characters are
    Japanese when any kana accompany them (at least 5% of the CJK letters), else Chinese.

    >>> detect_script("これは日本語の文です。")
    'ja'
    >>> detect_script("This is English.")
    'latin'
    """
    counts: dict[str, float] = {}
    letters = 0
    for ch in _CODE.sub(" ", text):
        if ch.isalpha():
            s = _script_of(ch)
            counts[s] = counts.get(s, 0.0) + _WEIGHT.get(s, 1.0)
            letters += 1
    if letters < MIN_LETTERS:
        return "unknown"
    cjk = counts.pop("han", 0.0) + counts.get("kana", 0.0)
    kana = counts.pop("kana", 0.0)
    if cjk:
        counts["ja" if kana >= 0.05 * cjk else "zh"] = cjk
    if "hangul" in counts:
        counts["ko"] = counts.pop("hangul")
    # Ties go to the alphabetically first script so the result never depends on dict order.
    return min(counts, key=lambda s: (-counts[s], s))


def script_for_language(code: str) -> str:
    """The script a language code is written in ('en', 'fr', 'de', ... -> 'latin')."""
    return _LANG_SCRIPT.get(code.lower().split("-")[0].split("_")[0], "latin")


def expected_script(question_text: str, language: str | None) -> str:
    """The script an answer should be in: from `language` when given, else from the question itself."""
    return script_for_language(language) if language else detect_script(question_text)


def language_mismatch(answer: str, expected: str) -> bool:
    """True when the answer is clearly in another script than `expected` (unknown never mismatches)."""
    got = detect_script(answer)
    return expected != "unknown" and got != "unknown" and got != expected

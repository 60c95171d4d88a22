"""The judgment cache: keyed by content, persistent, shared by concurrent processes."""

import subprocess
import sys

import optimizer.eval.judge.cache as cache_mod
from optimizer.eval.judge.cache import JudgmentCache, judgment_key

# The writers load cache.py by path: it is stdlib-only, and skipping the package import (torch) keeps the
# two processes' start-up from dwarfing the contention this test is about.
WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("judge_cache", sys.argv[3])
mod = sys.modules["judge_cache"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
JudgmentCache, judgment_key = mod.JudgmentCache, mod.judgment_key
cache = JudgmentCache(sys.argv[1])
start = int(sys.argv[2])
for i in range(start, start + 40):
    cache.put(judgment_key(i=i), judge="j", prompt="p", text="Rating: [[5]]", tokens_in=i, tokens_out=1)
cache.close()
"""


def test_cache_roundtrip_and_keys(tmp_path):
    path = tmp_path / "sub" / "cache.sqlite"
    cache = JudgmentCache(path)
    k = judgment_key(judge="openai:m", prompt="p", user="question and answer", index=0)
    assert k != judgment_key(judge="openai:m", prompt="p", user="question and answer", index=1)
    assert k != judgment_key(judge="openai:other", prompt="p", user="question and answer", index=0)
    assert cache.get_many([k]) == {}
    cache.put(k, judge="openai:m", prompt="p", text="Rating: [[6]]", tokens_in=10, tokens_out=3)
    cache.put(k, judge="openai:m", prompt="p", text="Rating: [[9]]", tokens_in=10, tokens_out=3)  # first wins
    cache.close()
    again = JudgmentCache(path)  # persistent across "runs"
    hit = again.get_many([k, "missing"])
    assert list(hit) == [k] and hit[k].text == "Rating: [[6]]" and hit[k].tokens_in == 10
    again.close()


def test_cache_is_safe_across_processes(tmp_path):
    path = tmp_path / "cache.sqlite"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(s), cache_mod.__file__])
             for s in (0, 20)]  # keys 20..39 are written by both
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    cache = JudgmentCache(path)
    assert len(cache) == 60
    assert len(cache.get_many([judgment_key(i=i) for i in range(60)])) == 60
    cache.close()

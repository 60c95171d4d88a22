"""README.md and README.ja.md say the same: the same commands in their code blocks, the same measured numbers
in their tables; and what the README's commands write is git-ignored."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READMES = (ROOT / "README.md", ROOT / "README.ja.md")
COMMAND = re.compile(r"^(make|python|\.venv/bin/)")
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e-?\d+)?(?:-\d+(?:\.\d+)?)?")


def code_lines(path: Path) -> list[str]:
    """Lines inside ``` blocks, `\\`-continued lines joined, comments (` # ...`) stripped, whitespace collapsed."""
    out, inside, pending = [], False, ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if inside:
            line = pending + " " + re.sub(r"\s+#\s.*$", "", line)
            pending = line[:-1] if line.endswith("\\") else ""
            if not pending:
                out.append(" ".join(line.split()))
    return out


def commands(path: Path) -> list[str]:
    return [line for line in code_lines(path) if COMMAND.match(line)]


def table_numbers(path: Path) -> list[str]:
    """Every number in the Markdown tables, in order (the measured results)."""
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    return [n for row in rows for n in NUMBER.findall(row.replace("`", " "))]


def test_both_readmes_list_the_same_commands():
    en, ja = (commands(p) for p in READMES)
    assert len(en) >= 10, en  # the set-up, usage and custom-model blocks
    assert ja == en


def test_both_readmes_report_the_same_numbers():
    en, ja = (table_numbers(p) for p in READMES)
    assert en and ja == en


def test_the_commands_cannot_drift_silently(tmp_path):
    """The check itself: a command changed in one README only is caught."""
    en = READMES[0].read_text(encoding="utf-8")
    drifted = tmp_path / "README.md"
    drifted.write_text(en.replace("n_trials=50", "n_trials=60", 1), encoding="utf-8")
    assert commands(drifted) != commands(READMES[1])


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="not a git checkout: .gitignore cannot be checked")
def test_what_the_readme_commands_write_is_git_ignored():
    outputs = {w.split("/")[0] + "/" for line in commands(READMES[0]) for w in line.split()
               if re.match(r"^(out|runs)/", w)}
    assert outputs == {"out/", "runs/"}
    for out in outputs:
        r = subprocess.run(["git", "check-ignore", "-q", f"{out}some/file"], cwd=ROOT)
        assert r.returncode == 0, f"{out} is not git-ignored"

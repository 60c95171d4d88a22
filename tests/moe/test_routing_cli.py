"""The README's frankenMoE commands run as written: build the demo MoE, then analyse its routing with the
prompt sets that ship in the package (found from any working directory)."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_command(module: str) -> list[str]:
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        words = shlex.split(line, comments=True) if line.startswith(".venv/bin/python -m ") else []
        if words[:3] == [".venv/bin/python", "-m", module]:
            return [sys.executable, *words[1:]]
    raise AssertionError(f"README.md has no `.venv/bin/python -m {module}` line")


def test_readme_moe_and_routing_commands_run(tmp_path):
    build = [w.replace("out/", f"{tmp_path}/out/") for w in readme_command("optimizer.moe")]
    r = subprocess.run(build, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    routing = readme_command("optimizer.routing")
    prompts = [w.split("=", 1)[1] for w in routing if "=" in w and w.endswith(".jsonl")]
    assert prompts and not any((tmp_path / p).exists() for p in prompts)  # found in the package, not the cwd
    r = subprocess.run(routing, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "routing" / "routing.json").read_text())
    names = [w.split("=", 1)[0] for w in routing if w.endswith(".jsonl")]
    assert list(report["domains"]) == names
    assert (tmp_path / "out" / "routing" / "routing.png").stat().st_size > 0


def test_missing_prompt_file_names_the_shipped_sets(tmp_path):
    from optimizer import UserError
    from optimizer.moe.routing_cli import read_prompts

    try:
        read_prompts("add=nope.jsonl", None, 10)
    except UserError as e:
        assert "data/routing/add.jsonl" in str(e)
    else:
        raise AssertionError("no error for a missing file")
    name, rows = read_prompts("kana=data/routing/kana.jsonl", None, 5)
    assert name == "kana" and len(rows) == 5 and rows[0].startswith("もんだい:")

"""The zoo's kana skill written as a local JGLUE copy, so `evaluator=jglue` runs offline on the demo zoo.

The kana questions are JCommonsenseQA-shaped (a question and 5 choices). Here they are written in JGLUE's
own schema (`q_id`, `question`, `choice0`..`choice4`, `label`; splits `train` and `validation`) in the folder
layout of the hub dataset `Rakuten/JGLUE` (config `JCommonsenseQA`), which `datasets.load_dataset(folder,
"JCommonsenseQA")` reads offline. Mainline lm-eval's `ja_leaderboard_jcommonsenseqa` then runs over it
unchanged (its prompt, 3-shot sampling from train, acc) with only its `dataset_path` pointed at the folder:

    python -m optimizer.zoo.jglue /tmp/jglue
    python -m optimizer evaluator=jglue \\
        'evaluator.tasks=[{name: ja_leaderboard_jcommonsenseqa, search_split: train, heldout_split: validation,
          num_fewshot: 3, limit: 100, dataset_path: /tmp/jglue}]'

The same layout holds a real JGLUE download for offline machines: one folder per config (`JCommonsenseQA/`,
`JNLI/`, `MARC-ja/`, `JSQuAD/`) with its train and validation JSONL files, and the `configs:` header in
README.md that `write_readme` writes; each task of the preset then gets `dataset_path: <that folder>`.

Generated at run time from the built zoo (`<zoo>/data/kana/{search,heldout}.jsonl`), never committed:
the zoo's search split becomes `train`, its held-out split `validation`, as the preset searches on train
and reports validation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from optimizer import UserError

CONFIG = "JCommonsenseQA"
SPLITS = {"train": "search", "validation": "heldout"}  # JGLUE split -> zoo split
N_CHOICES = 5
_QUESTION = "もんだい:"


def jglue_row(q_id: int, zoo_row: dict) -> dict:
    """A zoo kana row (`prompt`, `choices`, `label`) as a JCommonsenseQA row.

    >>> jglue_row(7, {"prompt": "もんだい:にせ は なに?\\nせんたくし:a,b\\nこたえ:", "choices": list("abcde"), "label": 1})
    {'q_id': 7, 'question': 'にせ は なに?', 'choice0': 'a', 'choice1': 'b', 'choice2': 'c', 'choice3': 'd', 'choice4': 'e', 'label': 1}
    """
    first = zoo_row["prompt"].split("\n", 1)[0]
    if not first.startswith(_QUESTION) or len(zoo_row["choices"]) != N_CHOICES:
        raise ValueError(f"not a zoo kana row: {zoo_row!r}")
    row = {"q_id": q_id, "question": first[len(_QUESTION):]}
    row.update({f"choice{i}": c for i, c in enumerate(zoo_row["choices"])})
    row["label"] = int(zoo_row["label"])
    return row


def write_readme(root: Path, configs: dict[str, dict[str, str]]) -> None:
    """README.md whose YAML header maps each config name to its split files (datasets' `configs:` key)."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {path}" for split, path in splits.items()]
    lines += ["---", "", "Local JGLUE-schema copy written by `python -m optimizer.zoo.jglue` (optimizer/zoo/jglue.py).", ""]
    (root / "README.md").write_text("\n".join(lines), encoding="utf-8")


def write_jcommonsenseqa(out: Path | str, zoo_root: Path | str | None = None) -> Path:
    """Write the kana skill as `out/JCommonsenseQA/{train,validation}-<hash>.jsonl` plus `out/README.md`.

    Args:
        out: the dataset folder (created; existing files of this config are replaced).
        zoo_root: a built zoo; default the demo zoo (built first if missing).

    Returns `out`, the folder to pass as the task's `dataset_path`.
    """
    from optimizer.zoo import ensure_zoo

    src = Path(zoo_root) if zoo_root is not None else ensure_zoo()
    root = Path(out).expanduser()
    (root / CONFIG).mkdir(parents=True, exist_ok=True)
    q_id = 0
    files = {}
    for split, zoo_split in SPLITS.items():
        path = src / "data" / "kana" / f"{zoo_split}.jsonl"
        if not path.is_file():
            raise UserError(f"{path} is missing: build the demo zoo first (python -m optimizer.zoo).")
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(jglue_row(q_id, json.loads(line)))
                q_id += 1
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        # `datasets` caches a local folder's splits under the folder's name and the file patterns of its
        # README, not the file contents: a content hash in the file name makes a regenerated copy (or another
        # folder of the same name) load as itself instead of as a stale cache entry.
        name = f"{split}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
        for old in (root / CONFIG).glob(f"{split}-*.jsonl"):
            old.unlink()
        (root / CONFIG / name).write_text(text, encoding="utf-8")
        files[split] = f"{CONFIG}/{name}"
    write_readme(root, {CONFIG: files})
    return root


def split_file(root: Path | str, split: str) -> Path:
    """The file of `split` ("train" or "validation") in a copy written by `write_jcommonsenseqa`."""
    found = sorted((Path(root) / CONFIG).glob(f"{split}-*.jsonl"))
    if len(found) != 1:
        raise UserError(f"{root} is not a copy written by python -m optimizer.zoo.jglue (no single {split} file).")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimizer.zoo.jglue", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="dataset folder to write (pass it as the task's dataset_path)")
    parser.add_argument("--zoo", default=None, help="a built zoo folder (default: the demo zoo)")
    args = parser.parse_args(argv)
    try:
        root = write_jcommonsenseqa(args.out, args.zoo)
    except UserError as e:
        print(f"error: {e}")
        return 2
    n = {s: sum(1 for _ in split_file(root, s).open(encoding="utf-8")) for s in SPLITS}
    print(f"wrote {root} ({CONFIG}: {n['train']} train, {n['validation']} validation rows); use it as "
          f"dataset_path of ja_leaderboard_jcommonsenseqa")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m optimizer.moe.measure` on the demo zoo, kept short: two of the demo's experts, few calibration
prompts and steps, the search split.

Checked against facts measured elsewhere: the dense rows are the zoo manifest's accuracies (the builder
scored the same folders), and with MLP-only experts and shared=base, oracle routing to an expert *is* that
expert, so the ceiling row repeats each expert's own-skill score.
"""

from __future__ import annotations

import json

import pytest
import yaml

from optimizer.moe.measure import main
from optimizer.resources import CONF_DIR

ONE_ITEM = 1 / 150 + 1e-9
SOURCE = {"add": "add_mlp", "rev": "rev_mlp"}  # expert name in the recipe -> zoo folder


@pytest.fixture(scope="module")
def zoo_manifest():
    from optimizer.zoo import MANIFEST, ensure_zoo

    return json.loads((ensure_zoo() / MANIFEST).read_text())


@pytest.fixture(scope="module")
def measured(tmp_path_factory, zoo_manifest):
    tmp = tmp_path_factory.mktemp("measure")
    demo = yaml.safe_load((CONF_DIR / "moe" / "demo.yaml").read_text(encoding="utf-8"))
    experts = [e for e in demo["experts"] if e["name"] in SOURCE]
    for e in experts:
        e["positive_prompts"], e["calibration_prompts"] = e["positive_prompts"][:8], e["calibration_prompts"][:8]
    recipe = {**demo, "experts": experts, "calibrate": {"steps": 5, "lr": 0.05, "rounds": 1}}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    assert main([str(path), "--split", "search", "--out", str(tmp / "out")]) == 0
    return json.loads((tmp / "out" / "table.json").read_text()), (tmp / "out" / "table.md").read_text()


def test_dense_rows_are_the_manifest(measured, zoo_manifest):
    table, _ = measured
    rows, stated = table["rows"], zoo_manifest["accuracy"]["search"]
    for row, folder in [("base", "base"), *SOURCE.items()]:
        want = {s: stated[folder][s] for s in ("add", "rev", "kana")}
        assert rows[row] == pytest.approx(want, abs=ONE_ITEM), row


def test_oracle_routing_is_each_expert(measured):
    table, _ = measured
    rows = table["rows"]
    oracle = rows["MoE, oracle routing (ceiling)"]
    assert set(oracle) == set(SOURCE)
    for skill in SOURCE:
        assert oracle[skill] == pytest.approx(rows[skill][skill], abs=ONE_ITEM)


def test_calibration_rows_and_routing(measured):
    table, text = measured
    rows, info = table["rows"], table["info"]
    calibrated = [k for k in rows if "+ calibration (" in k]
    assert len(calibrated) == 2 and "MoE, shared=merge (mean) + calibration" in rows
    for label in calibrated:
        acc = info[label]  # routing accuracy per skill on the prompts of the split
        assert set(acc) == set(SOURCE) and all(0 <= v <= 1 for v in acc.values())
    for rounds in (0, 1):
        stats = info[f"calibration, {rounds} rounds"]
        assert stats["accuracy_after"] >= stats["accuracy_before"] and stats["tokens"] > 0
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
    assert [ln.split(" | ")[0][2:] for ln in lines] == list(rows)
    assert "| MoE, oracle routing (ceiling) |" in text and " 1.00 |" in text.split("oracle")[1].splitlines()[0]

"""bench/synthetic.py's tables from the seeds' demo records, and the README's table in place."""

from __future__ import annotations

import json

import pytest

from adapt_deploy.demo import ADAPTED, DEMO_METHODS
from adapt_deploy.demo_reference import TABLE_END, TABLE_START, references_table
from bench.synthetic import (
    RECORD,
    class_table,
    goal_line,
    reference_of,
    replace_readme_table,
    run_seed,
    seed_table,
    stage_table,
)

STAGES = ["synthesis", "pretraining", "weak labels", *DEMO_METHODS, "export and stream"]


def record(seed: int, source: float, adapted: float) -> dict:
    miou = {"source_only": source, ADAPTED: adapted, "oracle": 58.0}
    iou = {m: {"road": v, "truck": None} for m, v in miou.items()}
    stages = {name: 10.0 * (k + 1) for k, name in enumerate(STAGES)}
    return {"seed": seed, "miou": miou, "iou": iou, "stages": stages, "reused": [],
            "wall": 300.0 + seed, "load": 2.0, "cpu": "Test CPU"}  # fmt: skip


@pytest.fixture
def records(tmp_path):
    made = [record(0, 22.0, 50.0), record(1, 24.0, 51.0), record(2, 20.0, 49.0)]
    for r in made:
        (tmp_path / f"seed{r['seed']}").mkdir()
        (tmp_path / f"seed{r['seed']}" / RECORD).write_text(json.dumps(r))
    return made


def test_reuse_reads_the_seeds_saved_demo(tmp_path, records):
    assert [run_seed(tmp_path, s, reuse=True) for s in (0, 1, 2)] == records


def test_tables_from_the_records(tmp_path, records):
    reference = reference_of(records, tmp_path)
    assert reference.seeds == [0, 1, 2] and reference.cpu == "Test CPU"
    assert reference.row("source_only").miou == [22.0, 24.0, 20.0]
    assert reference.gain().miou == [28.0, 27.0, 29.0]
    assert "| 1 | 24.0 | 51.0 | 58.0 | +27.0 | 301 | 2.0 |" in seed_table(records, reference)
    stages = stage_table(records)
    assert stages[2] == "| synthesis | 10 | 10 | 10 |"
    assert stages[-1] == "| **total** | 280 | 280 | 280 |"
    assert "| road | 22.0 | 50.0 | 58.0 |" in class_table(records, reference)
    assert "| truck | - | - | - |" in class_table(records, reference)
    # gain 28.0, largest spread 2.0 (source-only): 28 > 3 x 2
    assert "28.0 against 3 × 2.0 = 6.0: met" in goal_line(reference)


def test_goal_is_missed_when_the_gain_is_inside_the_spread(tmp_path):
    noisy = [record(0, 22.0, 25.0), record(1, 30.0, 28.0), record(2, 20.0, 27.0)]
    assert ": missed." in goal_line(reference_of(noisy, tmp_path))


def test_the_readme_table_is_replaced_between_its_markers(tmp_path, records):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{TABLE_START}\nold\n{TABLE_END}\n\nrest\n")
    table = references_table([reference_of(records, tmp_path)])
    replace_readme_table(table, readme)
    assert readme.read_text() == f"intro\n\n{table}\n\nrest\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="expected one demo table"):
        replace_readme_table(table, readme)

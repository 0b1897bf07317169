"""The demo's reference numbers: the README's table is rendered from them, bench/results/
synthetic.md carries the same table, and the demo's verdicts against them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapt_deploy.demo import ADAPTED, DEMO_METHODS
from adapt_deploy.demo_reference import (
    TABLE_END,
    TABLE_START,
    DemoReference,
    Row,
    compare_with_reference,
    load_reference,
    reference_table,
    write_reference,
)

ROOT = Path(__file__).resolve().parents[1]


def table_in(path: Path) -> str:
    """The demo table between its markers in a Markdown file."""
    text = path.read_text()
    assert text.count(TABLE_START) == 1 and text.count(TABLE_END) == 1, f"{path}: no demo table"
    return text[text.index(TABLE_START) : text.index(TABLE_END) + len(TABLE_END)]


def example() -> DemoReference:
    rows = [
        Row("source_only", "source only", "none", [20.0, 22.0, 24.0]),
        Row(ADAPTED, "adapted", "points", [50.0, 51.0, 49.0]),
        Row("oracle", "oracle", "every pixel", [58.0, 58.5, 57.5]),
    ]
    return DemoReference(rows, ADAPTED, [0, 1, 2], "Some CPU (2 cores)", [300.0, 310.0, 305.0])


def test_the_shipped_reference_covers_the_demo_over_three_seeds():
    reference = load_reference()
    assert reference is not None, "adapt_deploy/demo_reference.json is missing or unreadable"
    assert [r.method for r in reference.rows] == list(DEMO_METHODS)
    assert reference.adapted == ADAPTED and len(reference.seeds) >= 3
    assert all(len(r.miou) == len(reference.seeds) for r in reference.rows)


def test_readme_and_bench_results_carry_the_reference_table():
    expected = reference_table(load_reference())
    assert table_in(ROOT / "README.md") == expected
    assert table_in(ROOT / "bench" / "results" / "synthetic.md") == expected


def test_table_gives_mean_range_gain_and_spread():
    table = reference_table(example())
    assert "| source only | none | 22.0 | 20.0 to 24.0 |" in table
    assert "| adapted | points | 50.0 | 49.0 to 51.0 |" in table
    assert "| **gain of adaptation** | | **+28.0** | +25.0 to +30.0 |" in table
    assert "largest seed spread (std) of these rows is 2.6, so the gain is 11× the spread" in table
    assert "300 to 310 s per seed on Some CPU (2 cores)" in table


@pytest.mark.parametrize(
    ("miou", "verdicts"),
    [
        ({"source_only": 22.0, ADAPTED: 50.0, "oracle": 58.0}, ["inside"] * 4),
        ({"source_only": 24.05, ADAPTED: 49.1, "oracle": 57.5}, ["inside"] * 4),
        ({"source_only": 26.0, ADAPTED: 50.0, "oracle": 59.0},
         ["OUTSIDE", "inside", "OUTSIDE", "OUTSIDE"]),
    ],
)  # fmt: skip
def test_demo_numbers_against_the_reference(miou, verdicts):
    lines = compare_with_reference(miou, example())
    rows = [line for line in lines if line.startswith("  ") and "README" in line]
    assert [r.rsplit(": ", 1)[1] for r in rows] == verdicts
    assert rows[-1].startswith("  gain of adaptation: ")
    assert any("differ across CPUs" in line for line in lines) == ("OUTSIDE" in verdicts)


def test_reference_round_trips_and_bad_files_read_as_none(tmp_path):
    path = write_reference(example(), tmp_path / "ref.json")
    assert load_reference(path) == example()
    assert load_reference(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert load_reference(tmp_path / "bad.json") is None
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    assert load_reference(tmp_path / "other.json") is None


def test_one_seed_has_no_spread_to_compare_the_gain_with():
    one = DemoReference(
        [Row(r.method, r.title, r.labels, r.miou[:1]) for r in example().rows],
        ADAPTED, [0], "Some CPU", [300.0],
    )  # fmt: skip
    table = reference_table(one)
    assert "largest seed spread (std) of these rows is 0.0." in table
    assert "× the spread" not in table

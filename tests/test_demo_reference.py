"""The demo's reference numbers: the README's table is rendered from them, bench/results/
synthetic.md carries the same table, and the demo's verdicts against them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapt_deploy.demo import ADAPTED, DEMO_METHODS
from adapt_deploy.demo_reference import (
    REFERENCE_FORMAT,
    TABLE_END,
    TABLE_START,
    DemoReference,
    Row,
    compare_with_reference,
    cpu_model_of,
    load_reference,
    load_references,
    merge_reference,
    reference_for,
    references_table,
    write_references,
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


def other_machine() -> DemoReference:
    """The example's models measured on another CPU (2 cores visible, as machine_info says)."""
    rows = [
        Row("source_only", "source only", "none", [18.0, 19.0, 20.0]),
        Row(ADAPTED, "adapted", "points", [45.0, 46.0, 47.0]),
        Row("oracle", "oracle", "every pixel", [54.0, 55.0, 56.0]),
    ]
    cpu = "Other CPU (2 cores visible, torch threads 2)"
    return DemoReference(rows, ADAPTED, [0, 1, 2], cpu, [330.0, 340.0, 350.0])


def test_the_shipped_reference_covers_the_demo_over_three_seeds_per_machine():
    references = load_references()
    assert references, "adapt_deploy/demo_reference.json is missing or unreadable"
    for reference in references:
        assert [r.method for r in reference.rows] == list(DEMO_METHODS)
        assert reference.adapted == ADAPTED and len(reference.seeds) >= 3
        assert all(len(r.miou) == len(reference.seeds) for r in reference.rows)
    assert len({r.model for r in references}) == len(references)  # one entry per CPU model


def test_readme_and_bench_results_carry_the_reference_table():
    expected = references_table(load_references())
    assert table_in(ROOT / "README.md") == expected
    results = [p for p in (ROOT / "bench" / "results").glob("synthetic*.md")
               if TABLE_START in p.read_text()]  # fmt: skip
    assert ROOT / "bench" / "results" / "synthetic.md" in results
    for path in results:
        assert table_in(path) == expected, path


def test_table_gives_mean_range_gain_and_spread():
    table = references_table([example()])
    assert (
        "| model | target labels it uses | Some CPU (2 cores): mean of seeds 0, 1, 2 (range) |"
        in (table)
    )
    assert "| source only | none | 22.0 (20.0 to 24.0) |" in table
    assert "| adapted | points | 50.0 (49.0 to 51.0) |" in table
    assert "| **gain of adaptation** | | **+28.0** (+25.0 to +30.0) |" in table
    assert "largest seed spread (std) of these rows is 2.6 on Some CPU (2 cores), so the gain " in (
        table
    )
    assert "is 11× the spread" in table
    assert "300 to 310 s per seed on Some CPU (2 cores)" in table


def test_table_has_a_column_per_machine():
    table = references_table([example(), other_machine()])
    assert "| Some CPU (2 cores): mean of seeds 0, 1, 2 (range) | Other CPU: mean of" in table
    assert "| source only | none | 22.0 (20.0 to 24.0) | 19.0 (18.0 to 20.0) |" in table
    assert (
        "| **gain of adaptation** | | **+28.0** (+25.0 to +30.0) | **+27.0** (+27.0 to +27.0) |"
        in (table)
    )
    assert "330 to 350 s per seed on Other CPU (2 cores visible, torch threads 2)" in table
    later = DemoReference(other_machine().rows, ADAPTED, [3, 4, 5], other_machine().cpu, [1.0] * 3)
    assert "| Other CPU: mean of seeds 3, 4, 5 (range) |" in references_table([example(), later])


def test_the_demo_compares_with_its_own_cpu_model_or_every_machine():
    references = [example(), other_machine()]
    assert cpu_model_of(other_machine().cpu) == "Other CPU"
    assert reference_for(references, "Other CPU") == other_machine()
    joined = reference_for(references, "Unknown CPU")
    assert joined.row("source_only").miou == [20.0, 22.0, 24.0, 18.0, 19.0, 20.0]
    assert joined.gain().miou == [30.0, 29.0, 25.0, 27.0, 27.0, 27.0]
    miou = {"source_only": 19.0, ADAPTED: 46.0, "oracle": 55.0}
    own = compare_with_reference(miou, reference_for(references, "Other CPU"))
    assert all(line.endswith("inside") for line in own[1:])
    assert compare_with_reference(miou, example())[1].endswith("OUTSIDE")
    either = compare_with_reference(miou, joined)
    assert either[0].startswith("against the README (seeds 0, 1, 2, Some CPU (2 cores) / Other")
    assert all(line.endswith("inside") for line in either[1:])
    assert reference_for([], "Other CPU") is None


def test_a_new_measurement_replaces_its_cpu_models_entry_and_keeps_the_others():
    rerun = DemoReference(other_machine().rows, ADAPTED, [0, 1, 2],
                          "Other CPU (16 cores visible, torch threads 2)", [100.0] * 3)  # fmt: skip
    assert merge_reference([example()], other_machine()) == [example(), other_machine()]
    assert merge_reference([example(), other_machine()], rerun) == [example(), rerun]


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
    path = write_references([example(), other_machine()], tmp_path / "ref.json")
    assert load_references(path) == [example(), other_machine()]
    assert load_reference(path, cpu="Other CPU") == other_machine()
    assert load_reference(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert load_reference(tmp_path / "bad.json") is None
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    assert load_reference(tmp_path / "other.json") is None
    one = {"format": REFERENCE_FORMAT, **example().to_dict()}  # a file of one machine (before)
    (tmp_path / "one.json").write_text(json.dumps(one))
    assert load_references(tmp_path / "one.json") == [example()]


def test_one_seed_has_no_spread_to_compare_the_gain_with():
    one = DemoReference(
        [Row(r.method, r.title, r.labels, r.miou[:1]) for r in example().rows],
        ADAPTED, [0], "Some CPU", [300.0],
    )  # fmt: skip
    table = references_table([one])
    assert "largest seed spread (std) of these rows is 0.0 on Some CPU." in table
    assert "× the spread" not in table

"""Ours against the best baseline on every rendering of each stream: is a margin the frames'?

    python -m bench.tta.renderings [--results bench/results]

Reads what bench.tta wrote for each stream: drive's tta.md and tta_seedN.md, second's
tta_second.md and tta_second_seedN.md (`--render-seed N`: the same conditions rendered from
another seed, so other scenes), and writes tta_renderings.md beside them: per rendering, the
mean online mIoU of none, the best baseline and ours, ours' margin, and the four goals as that
report checked them. A results file of an older release that does not name its seed is the
stream's own rendering.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from bench.common import RESULTS, write_results
from bench.tta.cli import default_name
from bench.tta.conditions import STREAMS
from bench.tta.report import MEAN_MARGIN

SEED = re.compile(r"rendered from seed (\d+)")
GOALS = ("mean >=", "target per round", "target at end", "last round")


@dataclass
class Rendering:
    """One bench.tta report: its stream's seed, every method's mean, its goal verdicts."""

    path: Path
    seed: int
    means: dict[str, float]
    goals: dict[str, str]  # GOALS prefix → "met" / "MISSED"

    @property
    def best_baseline(self) -> tuple[str, float]:
        """(name, mean) of the best method that is not ours (ours_* variants included)."""
        others = {k: v for k, v in self.means.items() if not k.startswith("ours")}
        name = max(others, key=others.__getitem__)
        return name, others[name]


def tuned(stream: str, seed: int) -> bool:
    """Whether the adapter's defaults were set on this rendering: drive's own."""
    return stream == "drive" and seed == STREAMS["drive"].seed


def read_rendering(path: Path, own_seed: int) -> Rendering:
    """Parse a bench.tta report; ValueError naming the file when it has no mean table."""
    text = path.read_text()
    found = SEED.search(text)
    seed = int(found.group(1)) if found else own_seed
    means: dict[str, float] = {}
    in_table = False
    for line in text.splitlines():
        if line.startswith("| method | mean |"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] and not cells[0].startswith("---"):
                means[cells[0]] = float(cells[1])
    if "ours" not in means or all(k.startswith("ours") for k in means):
        raise ValueError(f"{path}: no mean online mIoU table with ours and a baseline")
    goals = {}
    for line in text.splitlines():
        for prefix in GOALS:
            if line.startswith(f"- {prefix}"):
                goals[prefix] = "MISSED" if ": MISSED" in line else "met"
    return Rendering(path, seed, means, goals)


def stream_renderings(results: Path, stream: str) -> list[Rendering]:
    """The stream's renderings found in `results`, by seed."""
    own = STREAMS[stream].seed
    base = default_name(stream)
    paths = [results / f"{base}.md", *sorted(results.glob(f"{base}_seed*.md"))]
    found = [read_rendering(p, own) for p in paths if p.exists()]
    return sorted(found, key=lambda r: r.seed)


def report(results: Path) -> str:
    """The Markdown body: one table per stream."""
    lines = [
        "Ours against the best baseline on each rendering of each stream (bench.tta "
        "--render-seed: the same conditions on other scenes). The defaults were set on drive's "
        f"own rendering (seed {STREAMS['drive'].seed}, marked); every other row is held out. Goal: "
        f"ours' mean >= the best baseline's + {MEAN_MARGIN}.",
        "",
    ]
    for stream in STREAMS:
        renderings = stream_renderings(results, stream)
        if not renderings:
            continue
        lines += [
            f"## {stream}",
            "",
            "| seed | file | none | best baseline | ours | ours - best | mean goal | clean "
            "target per round | clean target at end | last vs first | methods |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in renderings:
            name, best = r.best_baseline
            none = "-" if "none" not in r.means else f"{r.means['none']:.1f}"
            seed = f"{r.seed} (tuned on)" if tuned(stream, r.seed) else str(r.seed)
            cells = [
                seed, r.path.name, none, f"{name} {best:.1f}", f"{r.means['ours']:.1f}",
                f"{r.means['ours'] - best:+.1f}", *(r.goals.get(g, "-") for g in GOALS),
                ", ".join(r.means),
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        held_out = [r for r in renderings if not tuned(stream, r.seed)]
        margins = [r.means["ours"] - r.best_baseline[1] for r in held_out]
        lines.append("")
        if margins:
            lines.append(
                f"Held out ({len(margins)} rendering{'s' if len(margins) != 1 else ''}): "
                f"ours - best baseline {sum(margins) / len(margins):+.1f} on average, from "
                f"{min(margins):+.1f} to {max(margins):+.1f}; mean goal met on "
                f"{sum(r.goals.get('mean >=') == 'met' for r in held_out)}."
            )
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tta.renderings", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where bench.tta wrote its reports"
    )
    args = parser.parse_args(argv)
    try:
        body = report(args.results)
    except ValueError as exc:
        parser.error(str(exc))
    path = write_results("tta_renderings", "On-device adaptation across renderings", body,
                         args.results)  # fmt: skip
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""The demo's reference numbers: per seed mIoU of each model and the whole demo's time, as
`bench/synthetic.py` measured them. The README's demo table is rendered from them
(`reference_table`), and `adapt-deploy demo` prints its own numbers against their range."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from adapt_deploy.atomic import atomic_write_json

REFERENCE_FILE = Path(__file__).with_name("demo_reference.json")
REFERENCE_FORMAT = "adapt-deploy demo reference"
TABLE_START = "<!-- demo-table: written by bench/synthetic.py from demo_reference.json -->"
TABLE_END = "<!-- /demo-table -->"
GAIN = "gain"  # the adapted model's mIoU minus source-only's, per seed
CPU_NOTE = (
    "Training is deterministic on one machine, but results differ across CPUs: vectorised kernels "
    "differ in their last bits, and training amplifies the difference."
)


@dataclass(frozen=True)
class Row:
    """One model of the demo table: its method, title, the target labels it uses and the mIoU
    (%) of each seed."""

    method: str
    title: str
    labels: str
    miou: list[float]

    @property
    def mean(self) -> float:
        return statistics.mean(self.miou)

    @property
    def spread(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.miou) if len(self.miou) > 1 else 0.0

    def holds(self, value: float) -> bool:
        """Whether `value` (rounded to 0.1) lies within the seeds' range."""
        return min(self.miou) - 0.05 <= value <= max(self.miou) + 0.05


@dataclass(frozen=True)
class DemoReference:
    """What `demo_reference.json` holds: the models, the adapted one, seeds, machine, times."""

    rows: list[Row]
    adapted: str
    seeds: list[int]
    cpu: str
    seconds: list[float]  # the whole demo, per seed, from scratch

    def row(self, method: str) -> Row:
        return next(r for r in self.rows if r.method == method)

    def gain(self) -> Row:
        """The adapted model's mIoU minus source-only's, per seed, as a row."""
        adapted, source = self.row(self.adapted).miou, self.row("source_only").miou
        per_seed = [round(a - s, 1) for a, s in zip(adapted, source, strict=True)]
        return Row(GAIN, "gain of adaptation", "", per_seed)

    def largest_spread(self) -> float:
        """The largest seed spread (std) of any model's mIoU and of the gain."""
        return max(r.spread for r in [*self.rows, self.gain()])

    def to_dict(self) -> dict:
        return {
            "format": REFERENCE_FORMAT,
            "cpu": self.cpu,
            "seeds": self.seeds,
            "adapted": self.adapted,
            "seconds": self.seconds,
            "rows": [vars(r) for r in self.rows],
        }


def load_reference(path: Path = REFERENCE_FILE) -> DemoReference | None:
    """The reference at `path`; None when it is missing or not a reference file."""
    try:
        saved = json.loads(path.read_text())
        if saved.get("format") != REFERENCE_FORMAT:
            return None
        rows = [Row(**r) for r in saved["rows"]]
        return DemoReference(rows, saved["adapted"], saved["seeds"], saved["cpu"], saved["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_reference(reference: DemoReference, path: Path = REFERENCE_FILE) -> Path:
    atomic_write_json(path, reference.to_dict())
    return path


def _range(row: Row, sign: str = "") -> str:
    return f"{min(row.miou):{sign}.1f} to {max(row.miou):{sign}.1f}"


def reference_table(reference: DemoReference) -> str:
    """The README's demo table between its markers: mean and range over seeds of each model and
    of the gain, the spread, the time and the machine."""
    seeds = ", ".join(str(s) for s in reference.seeds)
    lines = [
        TABLE_START,
        f"| model | target labels it uses | mIoU, mean of seeds {seeds} | range |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.title} | {r.labels} | {r.mean:.1f} | {_range(r)} |" for r in reference.rows]
    gain = reference.gain()
    lines.append(f"| **{gain.title}** | | **{gain.mean:+.1f}** | {_range(gain, '+')} |")
    spread = reference.largest_spread()
    times = reference.seconds
    ratio = f", so the gain is {gain.mean / spread:.0f}× the spread" if spread > 0 else ""
    lines += [
        "",
        f"IoU in %, mIoU over the classes that occur in the benchmark, on the target val split. "
        f"The largest seed spread (std) of these rows is {spread:.1f}{ratio}. The whole demo took "
        f"{min(times):.0f} to {max(times):.0f} s per seed on {reference.cpu}. {CPU_NOTE}",
        TABLE_END,
    ]
    return "\n".join(lines)


def compare_with_reference(miou: dict[str, float], reference: DemoReference) -> list[str]:
    """Lines that put a demo's mIoU (%, per method) against the reference's range, and say
    whether each falls inside."""
    rows = [r for r in reference.rows if r.method in miou]
    if reference.adapted in miou and "source_only" in miou:
        own_gain = round(miou[reference.adapted] - miou["source_only"], 1)
        miou = {**miou, GAIN: own_gain}
        rows.append(reference.gain())
    lines = [f"against the README (seeds {', '.join(map(str, reference.seeds))}, {reference.cpu}):"]
    outside = False
    for row in rows:
        sign = "+" if row.method == GAIN else ""
        verdict = "inside" if row.holds(miou[row.method]) else "OUTSIDE"
        outside |= verdict == "OUTSIDE"
        lines.append(
            f"  {row.title}: {miou[row.method]:{sign}.1f}, README {row.mean:{sign}.1f} "
            f"({_range(row, sign)}): {verdict}"
        )
    if outside:
        lines.append(f"  {CPU_NOTE} What should hold everywhere is the gain's size.")
    return lines

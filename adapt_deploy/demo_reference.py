"""The demo's reference numbers: per CPU model it was measured on, per seed mIoU of each model
and the whole demo's time, as `bench/synthetic.py` measured them. The README's demo table is
rendered from them (`references_table`), and `adapt-deploy demo` prints its own numbers
against the range of its own CPU model, or of every listed machine when its CPU is not among
them: training is deterministic on one machine, but not across CPUs."""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import dataclass, replace
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

    @property
    def model(self) -> str:
        """The CPU model it was measured on, without the cores and threads."""
        return cpu_model_of(self.cpu)

    def to_dict(self) -> dict:
        return {
            "cpu": self.cpu,
            "seeds": self.seeds,
            "adapted": self.adapted,
            "seconds": self.seconds,
            "rows": [vars(r) for r in self.rows],
        }


def cpu_model_of(machine: str) -> str:
    """'Intel(R) Xeon(R) Processor' of 'Intel(R) Xeon(R) Processor (2 cores visible, torch
    threads 2)': a machine description without its core and thread counts."""
    head, _, tail = machine.rpartition(" (")
    return head if head and "cores visible" in tail else machine


def this_cpu_model() -> str:
    """This machine's CPU model name, as /proc/cpuinfo gives it (else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(saved: dict) -> DemoReference:
    rows = [Row(**r) for r in saved["rows"]]
    return DemoReference(rows, saved["adapted"], saved["seeds"], saved["cpu"], saved["seconds"])


def load_references(path: Path = REFERENCE_FILE) -> list[DemoReference]:
    """Every machine's reference at `path` (a file of one machine, as written before
    2026-12-07, too); empty when the file is missing or not a reference file."""
    try:
        saved = json.loads(path.read_text())
        if saved.get("format") != REFERENCE_FORMAT:
            return []
        return (
            [_machine(m) for m in saved["machines"]] if "machines" in saved else [_machine(saved)]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return []


def reference_for(references: list[DemoReference], cpu: str) -> DemoReference | None:
    """The reference measured on CPU model `cpu`; without one, every machine's seeds together
    (their ranges joined); None without references."""
    if not references:
        return None
    same = [r for r in references if r.model == cpu]
    if same:
        return same[0]
    first = references[0]
    rows = [
        replace(row, miou=[v for r in references for v in r.row(row.method).miou])
        for row in first.rows
    ]
    seeds = [s for r in references for s in r.seeds]
    seconds = [t for r in references for t in r.seconds]
    machines = " / ".join(r.cpu for r in references)
    return DemoReference(rows, first.adapted, seeds, machines, seconds)


def load_reference(path: Path = REFERENCE_FILE, cpu: str | None = None) -> DemoReference | None:
    """The reference for CPU model `cpu` (default: this machine's), see `reference_for`."""
    return reference_for(load_references(path), cpu if cpu is not None else this_cpu_model())


def merge_reference(references: list[DemoReference], new: DemoReference) -> list[DemoReference]:
    """`references` with `new` in place of the one of its CPU model, or added at the end."""
    if any(r.model == new.model for r in references):
        return [new if r.model == new.model else r for r in references]
    return [*references, new]


def write_references(references: list[DemoReference], path: Path = REFERENCE_FILE) -> Path:
    atomic_write_json(
        path, {"format": REFERENCE_FORMAT, "machines": [r.to_dict() for r in references]}
    )
    return path


def _range(row: Row, sign: str = "") -> str:
    return f"{min(row.miou):{sign}.1f} to {max(row.miou):{sign}.1f}"


def references_table(references: list[DemoReference]) -> str:
    """The README's demo table between its markers: per machine, the mean and range over its
    seeds of each model and of the gain; then the spread, the time and the machines."""
    header = "| model | target labels it uses |" + "".join(
        f" {r.model}: mean of seeds {', '.join(map(str, r.seeds))} (range) |" for r in references
    )
    lines = [TABLE_START, header, "|---|---|" + "---|" * len(references)]
    for row in references[0].rows:
        cells = "".join(
            f" {r.row(row.method).mean:.1f} ({_range(r.row(row.method))}) |" for r in references
        )
        lines.append(f"| {row.title} | {row.labels} |{cells}")
    gains = [r.gain() for r in references]
    cells = "".join(f" **{g.mean:+.1f}** ({_range(g, '+')}) |" for g in gains)
    lines.append(f"| **{gains[0].title}** | |{cells}")
    spreads = "; ".join(
        f"{r.largest_spread():.1f} on {r.model}"
        + (f", so the gain is {g.mean / r.largest_spread():.0f}× the spread"
           if r.largest_spread() > 0 else "")
        for r, g in zip(references, gains, strict=True)
    )  # fmt: skip
    times = "; ".join(
        f"{min(r.seconds):.0f} to {max(r.seconds):.0f} s per seed on {r.cpu}" for r in references
    )
    lines += [
        "",
        f"IoU in %, mIoU over the classes that occur in the benchmark, on the target val split. "
        f"The largest seed spread (std) of these rows is {spreads}. The whole demo took {times}. "
        f"{CPU_NOTE} The demo compares its numbers with the ranges of its own CPU model, or with "
        "every machine's together when its CPU is not listed.",
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
    seeds = ", ".join(str(s) for s in sorted(set(reference.seeds)))
    lines = [f"against the README (seeds {seeds}, {reference.cpu}):"]
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

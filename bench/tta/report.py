"""The results: the online mIoU plot and the Markdown report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from adapt_deploy.tta.options import AdaptOptions
from bench.tta.conditions import CLEAN, Stream
from bench.tta.runner import Run

MEAN_MARGIN = 1.5  # goal: ours' mean >= the best baseline's + this
CLEAN_SLACK = 0.5  # goal: ours on the clean target >= none's - this, per round and at the end
ROUND_SLACK = 1.0  # goal: ours' last round >= its first - this


def plot(runs: list[Run], stream: Stream, rounds: int, path: Path) -> None:
    """Online mIoU per (round, condition) segment, one line per method, as a PNG (OpenCV)."""
    width, height, margin = 960, 420, 60
    canvas = np.full((height, width, 3), 255, np.uint8)
    names = stream.names
    segments = rounds * len(names)
    values = [v for run in runs for v in run.miou.values()]
    low, high = math.floor(min(values) / 5) * 5, math.ceil(max(values) / 5) * 5
    colours = [
        (120, 120, 120), (200, 130, 0), (0, 140, 255), (40, 40, 220), (0, 160, 0), (170, 0, 170),
        (0, 110, 110), (140, 70, 20), (230, 0, 120),
    ]  # fmt: skip

    def xy(i: float, v: float) -> tuple[int, int]:
        x = margin + i * (width - 2 * margin) / max(segments - 1, 1)
        y = height - margin - (v - low) * (height - 2 * margin) / max(high - low, 1)
        return int(x), int(y)

    font = cv2.FONT_HERSHEY_SIMPLEX
    label_x = margin
    for v in range(int(low), int(high) + 1, 5):
        cv2.line(canvas, xy(0, v), xy(segments - 1, v), (225, 225, 225), 1)
        cv2.putText(canvas, str(v), (10, xy(0, v)[1] + 4), font, 0.4, (0, 0, 0), 1)
    for r in range(rounds):
        x = xy(r * len(names), low)[0]
        cv2.putText(canvas, f"r{r + 1}", (x, height - margin + 18), font, 0.4, (0, 0, 0), 1)
    for k, run in enumerate(runs):
        colour = colours[k % len(colours)]
        points = [
            xy(r * len(names) + c, run.miou[(r, name)])
            for r in range(rounds)
            for c, name in enumerate(names)
        ]
        cv2.polylines(canvas, [np.array(points, np.int32)], False, colour, 2, cv2.LINE_AA)
        cv2.putText(canvas, run.name, (label_x, 25), font, 0.5, colour, 2)
        label_x += cv2.getTextSize(run.name, font, 0.5, 2)[0][0] + 20
    title = f"online mIoU per condition ({', '.join(names)}) and round"
    cv2.putText(canvas, title, (margin, height - 15), font, 0.45, (0, 0, 0), 1)
    cv2.imwrite(str(path), canvas[:, :, ::-1])


def report(
    runs: list[Run],
    stream: Stream,
    rounds: int,
    frames: int,
    options: AdaptOptions,
    fps: dict[str, list[float]],
    worker: Any,
    package: dict[str, Any],
    name: str = "tta",
    model: str = "source-only model of bench.adaptation, seed 0",
    waited: Any = None,
) -> str:
    """The results Markdown; `name` is the results name (the plot is `name`.png beside it),
    `model` says which checkpoint the methods started from; `worker` and `waited`: the last
    throughput run's worker summary, in the background and with `--adapt-wait`."""
    names = stream.names
    base = {r.name: r for r in runs}.get("none")
    threads = "leaves torch's thread count" if options.threads is None else (
        f"runs torch on {options.threads} thread{'s' if options.threads != 1 else ''}"
    )  # fmt: skip
    lines = [
        f"Stream {stream.describe(frames, rounds)}; every frame scored before its update; "
        f"then the {CLEAN} frames once more, run the same way ('{CLEAN} at end'). "
        f"Model: {model}.",
        "",
        f"Default setting (ours): `{options}`",
        "",
        f"seconds: wall time of a method's {rounds} rounds; the adapter {threads} (its setting), "
        "the PyTorch baselines run on --threads (the thread count is restored after each method).",
        "",
        "## Mean online mIoU",
        "",
    ]
    columns = ["method", "mean", "round 1", "last round", "last - first", f"{CLEAN} at end"]
    columns += (["vs none"] if base else []) + ["seconds", "counts"]
    lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for run in runs:
        first, last = run.round_mean(0), run.round_mean(rounds - 1)
        counts = ", ".join(f"{k} {v}" for k, v in run.counts.items()) or "-"
        cells = [
            run.name, f"{run.mean():.1f}", f"{first:.1f}", f"{last:.1f}", f"{last - first:+.1f}",
            f"{run.clean_end:.1f}",
        ]  # fmt: skip
        if base:
            cells.append(f"{run.clean_end - base.clean_end:+.1f}")
        cells += [f"{run.seconds:.0f}", counts]
        lines.append("| " + " | ".join(cells) + " |")
    lines += goals(runs, rounds)
    lines += ["", "## Per condition (mean over rounds) and per round", ""]
    lines += ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for run in runs:
        cells = [np.mean([run.miou[(r, n)] for r in range(rounds)]) for n in names]
        lines.append(f"| {run.name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    lines += ["", "| method | " + " | ".join(f"r{r + 1}" for r in range(rounds)) + " |"]
    lines.append("|---" * (rounds + 1) + "|")
    for run in runs:
        cells = [run.round_mean(r) for r in range(rounds)]
        lines.append(f"| {run.name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    lines += ["", f"![online mIoU]({name}.png)", ""]
    if fps["without"]:
        without, with_ = np.median(fps["without"]), np.median(fps["with"])
        lines += [
            "## Throughput (stream pipeline, 256x512 video, ONNX Runtime CPU, stats written)",
            "",
            f"- without adaptation: {without:.1f} frames/s (runs: "
            + ", ".join(f"{v:.1f}" for v in fps["without"])
            + ")",
            f"- with adaptation (background worker, default setting): {with_:.1f} frames/s "
            "(runs: " + ", ".join(f"{v:.1f}" for v in fps["with"]) + ")",
            f"- cost: {100 * (1 - with_ / without):.1f}% of frames/s (goal <= 15%)",
        ]
        if worker is not None:
            lines += [f"- last run's worker: {line}" for line in worker.lines()]
        if fps.get("waited"):
            lines.append(
                f"- with `--adapt-wait` (every due frame's update before the next frame): "
                f"{np.median(fps['waited']):.1f} frames/s (runs: "
                + ", ".join(f"{v:.1f}" for v in fps["waited"])
                + ")"
            )
        if waited is not None:
            lines += [f"- last `--adapt-wait` run: {line}" for line in waited.lines()]
        lines.append("")
    lines += ["## Source statistics in the bundle (adaptation package)", ""]
    lines += [f"- {k}: {v}" for k, v in package.items()]
    return "\n".join(lines)


def goals(runs: list[Run], rounds: int) -> list[str]:
    """The issue's goals for `ours` against the others (none of whose names start with
    'ours'), as Markdown lines; nothing when ours or none did not run."""
    by_name = {r.name: r for r in runs}
    ours, none = by_name.get("ours"), by_name.get("none")
    baselines = [r for r in runs if not r.name.startswith("ours")]
    if ours is None or none is None:
        return []
    best = max(baselines, key=lambda r: r.mean())
    clean_rounds = [ours.miou[(r, CLEAN)] - none.miou[(r, CLEAN)] for r in range(rounds)]
    worst = int(np.argmin(clean_rounds))
    first, last = ours.round_mean(0), ours.round_mean(rounds - 1)
    checks = [
        (
            f"mean >= best baseline ({best.name}, {best.mean():.1f}) + {MEAN_MARGIN}",
            ours.mean() - best.mean() >= MEAN_MARGIN,
            f"{ours.mean():.1f} ({ours.mean() - best.mean():+.1f})",
        ),
        (
            f"{CLEAN} per round >= none - {CLEAN_SLACK}",
            clean_rounds[worst] >= -CLEAN_SLACK,
            f"worst round r{worst + 1}: {clean_rounds[worst]:+.1f}",
        ),
        (
            f"{CLEAN} at end >= none - {CLEAN_SLACK}",
            ours.clean_end - none.clean_end >= -CLEAN_SLACK,
            f"{ours.clean_end:.1f} vs {none.clean_end:.1f}",
        ),
        (
            f"last round >= first round - {ROUND_SLACK}",
            last - first >= -ROUND_SLACK,
            f"{last:.1f} vs {first:.1f}",
        ),
    ]
    lines = ["", "Goals (ours):", ""]
    lines += [f"- {text}: {'met' if ok else 'MISSED'} ({value})" for text, ok, value in checks]
    return lines

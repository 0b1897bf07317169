"""Loss and mIoU curves of a run as one image, drawn from its `metrics.jsonl` with OpenCV: for
users without TensorBoard. Needs neither torch nor matplotlib."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from adapt_deploy.atomic import atomic_write
from adapt_deploy.errors import UserError

METRICS = "metrics.jsonl"
CURVES = "curves.png"
NOT_LOSSES = ("iteration", "lr", "images_per_second")  # keys of a training record, not losses
TOTAL = "loss (total)"  # the legend's name of the `loss` key
PANEL = (700, 560)  # (width, height) of each of the two panels, side by side
MARGINS = (80, 24, 56, 64)  # left, right, top, bottom: room for the title and tick labels
SMOOTHING_POINTS = 40  # the moving average spans about 1/40 of the records
FONT = cv2.FONT_HERSHEY_SIMPLEX
INK, GRID, FAINT = (40, 40, 40), (225, 225, 225), 0.3  # FAINT: opacity of the raw loss curves
COLOURS = (  # BGR, matplotlib's tab10
    (180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
    (75, 86, 140), (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23),
)  # fmt: skip

Record = dict[str, Any]


def read_metrics(path: Path) -> tuple[list[Record], list[Record]]:
    """The training and the evaluation records of a `metrics.jsonl`, in iteration order.

    A resumed run appends after what its last state saved, so a record at or before the previous
    one's iteration drops the records from there on (those of the lost iterations), as
    TensorBoard does. A last line without its newline is one being written and is skipped.
    UserError naming the file, and the line, when it is missing, empty or not such a file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no metrics to plot: {path} does not exist (is it a training run?)")
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    train: list[Record] = []
    evals: list[Record] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: still being written
                continue
            raise UserError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
        _check_record(record, path, number)
        iteration = record["iteration"]
        if "eval" in record:
            if evals and iteration <= evals[-1]["iteration"]:  # evaluated again
                evals = [r for r in evals if r["iteration"] < iteration]
            evals.append(record)
        else:
            if train and iteration <= train[-1]["iteration"]:  # resumed: later records are lost
                train = [r for r in train if r["iteration"] < iteration]
                evals = [r for r in evals if r["iteration"] < iteration]
            train.append(record)
    if not train and not evals:
        raise UserError(f"{path} holds no records yet: nothing to plot")
    return train, evals


def _check_record(record: object, path: Path, number: int) -> None:
    where = f"{path}, line {number}"
    if not isinstance(record, dict) or not _is_int(record.get("iteration")):
        raise UserError(f"{where}: not a metrics record (no integer 'iteration')")
    if "eval" in record:
        summary = record["eval"]
        if not isinstance(summary, dict) or not _is_number(summary.get("miou")):
            raise UserError(f"{where}: an evaluation record without a number 'miou'")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def loss_terms(train: list[Record]) -> list[str]:
    """The loss keys of the training records, in order of first appearance."""
    terms: dict[str, None] = {}
    for record in train:
        for key, value in record.items():
            if key not in NOT_LOSSES and _is_number(value):
                terms.setdefault(key)
    return list(terms)


def series(records: list[Record], get: Any) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values) of the records where `get(record)` is a finite number."""
    points = [(r["iteration"], get(r)) for r in records]
    points = [(i, float(v)) for i, v in points if _is_number(v) and math.isfinite(v)]
    xs, ys = zip(*points, strict=True) if points else ((), ())
    return np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """The centred mean over `window` values; the window shrinks at either end."""
    window = min(window, len(values))
    if window <= 1:
        return values.astype(np.float64)
    kernel = np.ones(window)
    sums = np.convolve(values, kernel, mode="same")
    counts = np.convolve(np.ones(len(values)), kernel, mode="same")
    return sums / counts


def nice_ticks(low: float, high: float, count: int = 6, cover: bool = False) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) from `low` to `high`; with `cover`,
    from the last one at or below `low` to the first one at or above `high`."""
    if not high > low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    ratio = raw / power  # in [1, 10): round it to 1, 2, 5 or 10
    step = power * (1 if ratio < 1.5 else 2 if ratio < 3 else 5 if ratio < 7 else 10)
    first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
    if cover:
        first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def log_ticks(low: float, high: float) -> list[float]:
    """Powers of ten from `low` to `high`, with 2x and 5x between them over a short range."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    steps = (1, 2, 5) if last - first <= 2 else (1,)
    ticks = [m * 10.0**e for e in range(first, last + 1) for m in steps]
    return [t for t in ticks if low * (1 - 1e-9) <= t <= high * (1 + 1e-9)]


def tick_label(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


@dataclass
class Axes:
    """A plot area inside a panel: maps data to pixels, draws frame, grid, ticks and title."""

    canvas: np.ndarray
    left: int
    top: int
    width: int
    height: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    log_y: bool = False

    def px(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """(N, 2) int32 pixel positions of data points."""
        x0, x1 = self.x_range
        y0, y1 = (math.log10(v) for v in self.y_range) if self.log_y else self.y_range
        yv = np.log10(ys) if self.log_y else ys
        u = self.left + (xs - x0) / (x1 - x0) * self.width
        v = self.top + self.height - (yv - y0) / (y1 - y0) * self.height
        v = np.clip(v, self.top, self.top + self.height)
        return np.round(np.stack([u, v], axis=1)).astype(np.int32)

    def frame(self, title: str, x_label: str, y_ticks: Sequence[float]) -> None:
        bottom, right = self.top + self.height, self.left + self.width
        for x in nice_ticks(*self.x_range):
            u = int(self.px(np.array([x]), np.array([self.y_range[0]]))[0, 0])
            cv2.line(self.canvas, (u, self.top), (u, bottom), GRID, 1)
            _text(self.canvas, tick_label(x), (u, bottom + 18), 0.42, centre=True)
        for y in y_ticks:
            v = int(self.px(np.array([self.x_range[0]]), np.array([y]))[0, 1])
            cv2.line(self.canvas, (self.left, v), (right, v), GRID, 1)
            _text(self.canvas, tick_label(y), (self.left - 8, v + 5), 0.42, align_right=True)
        cv2.rectangle(self.canvas, (self.left, self.top), (right, bottom), INK, 1)
        _text(self.canvas, x_label, (self.left + self.width // 2, bottom + 44), 0.5, centre=True)
        _text(self.canvas, title, (self.left, self.top - 16), 0.6, thickness=2)

    def legend(
        self, names: Sequence[str], colours: Sequence[tuple[int, int, int]], top: bool = True
    ) -> None:
        """A boxed key in the top-right (or bottom-right) corner of the plot area."""
        widths = [cv2.getTextSize(n, FONT, 0.45, 1)[0][0] for n in names]
        box_w, box_h = max(widths) + 44, 20 * len(names) + 8
        x0 = self.left + self.width - box_w - 8
        y0 = self.top + 8 if top else self.top + self.height - box_h - 8
        cv2.rectangle(self.canvas, (x0, y0), (x0 + box_w, y0 + box_h), (255, 255, 255), -1)
        cv2.rectangle(self.canvas, (x0, y0), (x0 + box_w, y0 + box_h), INK, 1)
        for i, (name, colour) in enumerate(zip(names, colours, strict=True)):
            v = y0 + 14 + 20 * i
            cv2.line(self.canvas, (x0 + 8, v), (x0 + 30, v), colour, 2, cv2.LINE_AA)
            _text(self.canvas, name, (x0 + 36, v + 5), 0.45)


def _text(
    canvas: np.ndarray,
    text: str,
    origin: tuple[int, int],
    scale: float,
    thickness: int = 1,
    centre: bool = False,
    align_right: bool = False,
) -> None:
    (width, _), _ = cv2.getTextSize(text, FONT, scale, thickness)
    x, y = origin
    x -= width // 2 if centre else width if align_right else 0
    cv2.putText(canvas, text, (x, y), FONT, scale, INK, thickness, cv2.LINE_AA)


def _plot_area(panel: np.ndarray) -> tuple[int, int, int, int]:
    left, right, top, bottom = MARGINS
    return left, top, panel.shape[1] - left - right, panel.shape[0] - top - bottom


def _x_range(train: list[Record], evals: list[Record]) -> tuple[float, float]:
    last = max(r["iteration"] for r in train + evals)
    return 0.0, float(max(last, 1))


def draw_losses(panel: np.ndarray, train: list[Record], x_range: tuple[float, float]) -> None:
    """Each loss term against the iteration: raw faintly, its moving average on top."""
    terms = loss_terms(train)
    curves = {t: series(train, lambda r, t=t: r.get(t)) for t in terms}
    curves = {t: c for t, c in curves.items() if len(c[0])}
    left, top, width, height = _plot_area(panel)
    if not curves:
        _empty(panel, "training losses", "no training records yet")
        return
    values = np.concatenate([ys for _, ys in curves.values()])
    low, high = float(values.min()), float(values.max())
    log_y = low > 0 and high / low >= 20
    if log_y:
        y_range = (10 ** math.floor(math.log10(low)), 10 ** math.ceil(math.log10(high)))
        y_ticks = log_ticks(*y_range)
    else:
        y_ticks = nice_ticks(min(low, 0.0), max(high, low + 1e-6), cover=True)
        y_range = (y_ticks[0], y_ticks[-1])
    axes = Axes(panel, left, top, width, height, x_range, y_range, log_y)
    window = max(1, round(len(train) / SMOOTHING_POINTS))
    notes = []
    if window > 1:
        notes.append(f"moving average of {window}")
    if log_y:
        notes.append("log scale")
    title = f"training losses ({', '.join(notes)})" if notes else "training losses"
    axes.frame(title, "iteration", y_ticks)
    raw = panel.copy()
    if "loss" in curves:  # the total, drawn dark on top of its terms
        curves["loss"] = curves.pop("loss")
    colours = [INK if k == "loss" else COLOURS[i % len(COLOURS)] for i, k in enumerate(curves)]
    for (xs, ys), colour in zip(curves.values(), colours, strict=True):
        cv2.polylines(raw, [axes.px(xs, ys)], False, colour, 1, cv2.LINE_AA)
    cv2.addWeighted(raw, FAINT, panel, 1 - FAINT, 0, dst=panel)
    for (xs, ys), colour in zip(curves.values(), colours, strict=True):
        smooth = moving_average(ys, window)
        thickness = 1 if colour == INK else 2  # the total stays visible over a term it equals
        cv2.polylines(panel, [axes.px(xs, smooth)], False, colour, thickness, cv2.LINE_AA)
    axes.legend([TOTAL if k == "loss" else k for k in curves], colours)


def draw_miou(panel: np.ndarray, evals: list[Record], x_range: tuple[float, float]) -> None:
    """Each mIoU of the evaluation protocol against the iteration, as points joined by lines."""
    names: dict[str, None] = {}
    for record in evals:
        names.update(dict.fromkeys(record["eval"].get("mious") or {"mIoU": None}))
    curves = {n: series(evals, lambda r, n=n: _miou(r["eval"], n)) for n in names}
    curves = {n: c for n, c in curves.items() if len(c[0])}
    if not curves:
        _empty(panel, "evaluation mIoU (%)", "no evaluation yet")
        return
    values = np.concatenate([ys for _, ys in curves.values()])
    low, high = max(0.0, float(values.min()) - 2), min(100.0, float(values.max()) + 2)
    y_ticks = nice_ticks(low, max(high, low + 1), cover=True)
    y_range = (y_ticks[0], y_ticks[-1])
    left, top, width, height = _plot_area(panel)
    axes = Axes(panel, left, top, width, height, x_range, y_range)
    axes.frame("evaluation mIoU (%)", "iteration", y_ticks)
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(curves))]
    for (xs, ys), colour in zip(curves.values(), colours, strict=True):
        points = axes.px(xs, ys)
        cv2.polylines(panel, [points], False, colour, 2, cv2.LINE_AA)
        for u, v in points:
            cv2.circle(panel, (int(u), int(v)), 4, colour, -1, cv2.LINE_AA)
        u, v = points[-1]
        _text(panel, f"{ys[-1]:.1f}", (int(u) - 8, int(v) - 10), 0.45, align_right=True)
    axes.legend(list(curves), colours, top=False)  # mIoU rises: the bottom right is free


def _miou(summary: Record, name: str) -> Any:
    mious = summary.get("mious") or {}
    return mious.get(name) if mious else summary.get("miou")


def _empty(panel: np.ndarray, title: str, message: str) -> None:
    left, top, width, height = _plot_area(panel)
    cv2.rectangle(panel, (left, top), (left + width, top + height), INK, 1)
    _text(panel, title, (left, top - 16), 0.6, thickness=2)
    _text(panel, message, (left + width // 2, top + height // 2), 0.8, 2, centre=True)


def render(train: list[Record], evals: list[Record]) -> np.ndarray:
    """The two panels side by side, BGR uint8: losses on the left, mIoU on the right."""
    width, height = PANEL
    losses, miou = (np.full((height, width, 3), 255, np.uint8) for _ in range(2))
    x_range = _x_range(train, evals)
    draw_losses(losses, train, x_range)
    draw_miou(miou, evals, x_range)
    return np.hstack([losses, miou])


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw `run_dir/metrics.jsonl` into `out` (default `run_dir/curves.png`), atomically;
    returns where it went. A .png or .jpg name."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / CURVES
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"cannot write {out}: give a .png or .jpg file name")
    train, evals = read_metrics(run_dir / METRICS)
    ok, encoded = cv2.imencode(out.suffix.lower(), render(train, evals))
    if not ok:
        raise UserError(f"cannot encode the plot as {out.suffix}")
    atomic_write(out, encoded.tobytes())
    return out

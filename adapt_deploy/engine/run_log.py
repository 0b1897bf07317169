"""A run's log: `metrics.jsonl` (one JSON line per logged iteration or evaluation) and, when the
tensorboard package is installed, TensorBoard event files beside it in the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from adapt_deploy.engine.evaluate import EvalResult
from adapt_deploy.errors import UserError
from adapt_deploy.run_plot import METRICS, NOT_LOSSES

TB_INSTALL = "pip install 'adapt-deploy[tb]'"
TAIL = 1 << 16  # bytes read back to find the start of a partial last line
FLUSH_SECS = 30  # TensorBoard sees new scalars within this long (evaluations flush at once)


def summary_writer_class() -> type | None:
    """torch's SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def check_tensorboard(tensorboard: bool | None) -> None:
    """A UserError when TensorBoard is required (train.tensorboard true) but not installed."""
    if tensorboard is True and summary_writer_class() is None:
        raise UserError(
            "config key 'train.tensorboard' is true, but the tensorboard package is not "
            f"installed; install it with: {TB_INSTALL}"
        )


def loss_tag(key: str) -> str:
    """The TensorBoard tag of a training record's key: `loss` (the segmentation network's total)
    is `loss/total`, a term such as `seg` or `d_out` is `loss/<term>`."""
    return "loss/total" if key == "loss" else f"loss/{key}"


class RunLog:
    """Appends a run's training and evaluation records to `run_dir/metrics.jsonl` and, unless
    off, writes TensorBoard event files into `run_dir`. Only rank 0 opens one.

    `start` is the iteration a resumed run continues from (its saved state's): TensorBoard drops
    whatever earlier event files logged after it (a crash's lost iterations), as the readers of
    `metrics.jsonl` do. `tensorboard`: None writes events when the package is installed, True
    requires it, False writes none.
    """

    def __init__(self, run_dir: Path, start: int = 0, tensorboard: bool | None = None) -> None:
        self.run_dir = Path(run_dir)
        check_tensorboard(tensorboard)
        writer_class = summary_writer_class() if tensorboard is not False else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS
        _drop_partial_line(path)
        self._file: IO[str] = path.open("a")
        self._writer: Any = None
        if writer_class is not None:
            try:
                self._writer = writer_class(
                    log_dir=str(self.run_dir),
                    purge_step=start + 1 if start > 0 else None,
                    flush_secs=FLUSH_SECS,
                )
            except BaseException:
                self._file.close()
                raise

    @property
    def tensorboard_on(self) -> bool:
        """Whether event files are being written."""
        return self._writer is not None

    def log_train(
        self, iteration: int, metrics: dict[str, float], images_per_second: float
    ) -> None:
        """One training record: every loss term and the lr, as `train_step` returns them, and
        the throughput since the previous record."""
        record = {"iteration": iteration, **metrics, "images_per_second": images_per_second}
        self._write(record)
        if self._writer is None:
            return
        for key, value in metrics.items():
            tag = key if key in NOT_LOSSES else loss_tag(key)
            self._writer.add_scalar(tag, value, iteration)
        self._writer.add_scalar("images_per_second", images_per_second, iteration)

    def log_eval(
        self, iteration: int, result: EvalResult, overlays: list[np.ndarray] | None = None
    ) -> None:
        """One evaluation record (`EvalResult.to_dict()` without the confusion matrix, IoU in
        percent) and, in TensorBoard, its mIoUs, IoU per class and `overlays` (HWC uint8 RGB)."""
        summary = {k: v for k, v in result.to_dict().items() if k != "confusion"}
        self._write({"iteration": iteration, "eval": summary})
        if self._writer is None:
            return
        scalars = {"eval/mIoU": summary["miou"], "eval/pixel_accuracy": summary["pixel_accuracy"]}
        scalars |= {f"eval/{name}": value for name, value in summary["mious"].items()}
        scalars |= {f"eval_iou/{name}": v for name, v in summary["iou"].items() if v is not None}
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, iteration)
        for i, image in enumerate(overlays or []):
            self._writer.add_image(f"eval/prediction_{i}", image, iteration, dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        """Flush and close both outputs (the event file even when the JSON file fails)."""
        try:
            self._file.close()
        finally:
            if self._writer is not None:
                self._writer.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()


def _drop_partial_line(path: Path) -> None:
    """Cut a last line without its newline (a crash mid-write) so that appended records start on
    a line of their own."""
    if not path.is_file():
        return
    with path.open("r+b") as f:
        size = f.seek(0, 2)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        start = max(0, size - TAIL)
        f.seek(start)
        tail = f.read()
        if b"\n" not in tail and start > 0:  # a last line longer than TAIL: read it all
            start = 0
            f.seek(0)
            tail = f.read()
        f.truncate(start + tail.rfind(b"\n") + 1)

"""What a stream writes: the overlay video, per-frame label PNGs and a JSONL of per-frame stats.

Every destination is checked before the first frame is read, so a wrong path fails at once. An
MP4 keeps its index at the end and is unplayable until `release()` writes it: the pipeline
releases the video on Ctrl-C and SIGTERM, and `.mkv` or `.avi` outputs still play up to the last
block flushed to disk when the process is killed outright (SIGKILL, power loss).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from adapt_deploy.errors import UserError

FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1]


class OutputError(UserError):
    """An output path that cannot be written."""


def writable_directory(directory: Path, option: str) -> Path:
    """Create `directory` if needed and prove a file can be written in it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".adapt-deploy-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{option} {directory}: not a writable directory ({exc})") from None
    return directory


class VideoSink:
    """The overlay video at the source's fps and first frame's size (later frames resized to it).

    MPEG-4 Part 2 (`mp4v`, `MJPG` in .avi): OpenCV's wheels cannot write H.264.
    """

    def __init__(self, path: Path, fps: float) -> None:
        self.path = Path(path)
        self.fps = fps
        self.fourcc = _fourcc(self.path)
        self.frames = 0
        self.resized = 0  # frames that had another size than the first
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None

    @staticmethod
    def check(path: Path) -> None:
        """Fail now if `path` cannot take a video: write and delete a tiny one beside it."""
        path = Path(path)
        code = cv2.VideoWriter_fourcc(*_fourcc(path))
        writable_directory(path.parent, "--out")
        if path.is_dir():
            raise OutputError(f"--out {path}: is a directory, expected a video file name")
        if path.exists() and not os.access(path, os.W_OK):
            raise OutputError(f"--out {path}: the existing file is not writable")
        probe = path.with_name(f".probe-{os.getpid()}-{path.name}")
        writer = cv2.VideoWriter(str(probe), code, 10.0, (64, 64))
        ok = writer.isOpened()
        if ok:
            writer.write(np.zeros((64, 64, 3), np.uint8))
        writer.release()
        probe.unlink(missing_ok=True)
        if not ok:
            raise OutputError(f"--out {path}: OpenCV cannot write {_fourcc(path)} video there")

    def write(self, rgb: np.ndarray) -> None:
        """Append one RGB frame."""
        height, width = rgb.shape[:2]
        if self._writer is None:
            self._size = (width, height)
            code = cv2.VideoWriter_fourcc(*self.fourcc)
            self._writer = cv2.VideoWriter(str(self.path), code, self.fps, self._size)
            if not self._writer.isOpened():
                raise OutputError(f"--out {self.path}: cannot open a {width}x{height} video")
        elif (width, height) != self._size:
            rgb = cv2.resize(rgb, self._size, interpolation=cv2.INTER_AREA)
            self.resized += 1
        self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def release(self) -> None:
        """Finish the file (an MP4's index is written here); safe to call twice."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None


class LabelWriter:
    """`DIR/{index:06d}.png`: each frame's trainIds at the frame's own size, as single channel."""

    def __init__(self, directory: Path) -> None:
        self.directory = writable_directory(directory, "--labels-dir")

    def write(self, index: int, labels: np.ndarray) -> None:
        path = self.directory / f"{index:06d}.png"
        if not cv2.imwrite(str(path), labels, _PNG):
            raise OSError(f"cannot write {path}")


class StatsWriter:
    """One JSON line per frame, flushed at once: a killed stream leaves only complete lines."""

    def __init__(self, path: Path, classes: list[str]) -> None:
        self.path = Path(path)
        self.classes = list(classes)
        self.check(self.path)
        try:
            self._file: IO[str] | None = self.path.open("w", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"--stats {self.path}: cannot write ({exc})") from None

    @staticmethod
    def check(path: Path) -> None:
        """Fail now if `path` cannot be written."""
        writable_directory(Path(path).parent, "--stats")
        if Path(path).is_dir():
            raise OutputError(f"--stats {path}: is a directory, expected a file name")

    def write(
        self, index: int, timestamp: float, latency: float, infer: float, presence: np.ndarray
    ) -> None:
        """index, timestamp (s), latency (decode → labels, s), infer (the backend's total, s),
        presence per class name."""
        assert self._file is not None
        record = {
            "index": index,
            "timestamp": round(timestamp, 6),
            "latency": round(latency, 6),
            "infer": round(infer, 6),
            "presence": {
                c: round(float(p), 4) for c, p in zip(self.classes, presence, strict=True)
            },
        }
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_event(self, event: dict[str, Any]) -> None:
        """An adaptation event line: {"event": kind, "frame": index, ...}."""
        assert self._file is not None
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _fourcc(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FOURCC:
        raise OutputError(
            f"--out {path}: unknown video container {suffix or '(no suffix)'!r}; expected "
            f"{', '.join(FOURCC)} (.mkv and .avi stay playable if the process is killed)"
        )
    return FOURCC[suffix]


class Window:
    """`--show`: the overlay in an OpenCV window; `q` or Esc asks the stream to stop."""

    NAME = "adapt-deploy stream"

    def __init__(self) -> None:
        try:
            cv2.namedWindow(self.NAME, cv2.WINDOW_NORMAL)
        except cv2.error:
            raise OutputError(
                "--show needs an OpenCV built with a GUI (this one has none: "
                "opencv-python-headless); install opencv-python instead, or drop --show"
            ) from None

    def show(self, rgb: np.ndarray) -> bool:
        """Display a frame; False when the user asked to stop."""
        cv2.imshow(self.NAME, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        return cv2.waitKey(1) & 0xFF not in (ord("q"), 27)

    def close(self) -> None:
        cv2.destroyWindow(self.NAME)


def check_destinations(out: Path | None, labels_dir: Path | None, stats: Path | None) -> None:
    """Fail before any frame is processed when one of the outputs cannot be written."""
    if out is not None:
        VideoSink.check(out)
    if labels_dir is not None:
        writable_directory(labels_dir, "--labels-dir")
    if stats is not None:
        StatsWriter.check(stats)

"""What a stream writes: the overlay video, per-frame label PNGs and a JSONL of per-frame stats.

Every output is written under a hidden temporary name beside its target (`.NAME.partial-PID.EXT`,
labels into `DIR/.partial-PID/`) and renamed onto it only when the stream ends with at least one
frame: a stream that fails, or segments nothing, leaves whatever was there before. Ctrl-C and
SIGTERM end the stream cleanly, so its outputs are finished and renamed with every frame done so
far. A process killed outright (SIGKILL, power loss) leaves only the temporary files: a partial
`.mkv` or `.avi` there plays up to its last flushed block, an MP4 does not (its index is written
at the end). Before the rename the overlay video is read back and its frames counted, so a disk
that filled up mid-run is an error, not a short video reported as complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO, Any

import numpy as np

from adapt_deploy.runtime.colors import colour_table, overlay
from adapt_deploy.stream.destinations import (
    OutputError,
    creatable_directory,
    existing_frame_labels,
    writable_directory,
)
from adapt_deploy.stream.opencv import cv2

FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1]


def partial_path(path: Path) -> Path:
    """The hidden name an output is written under until the stream ends (suffix kept: OpenCV
    picks the container from it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def count_video_frames(path: Path, expected: int) -> int:
    """Frames that decode from the video at `path`. Where the container's own count equals
    `expected` and its last frame decodes, that is the answer (no full decode); otherwise every
    frame is read and counted."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            return 0
        listed = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        if listed == expected > 0:
            capture.set(cv2.CAP_PROP_POS_FRAMES, expected - 1)
            if capture.grab() and not capture.grab():
                return expected
            capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
        count = 0
        while capture.grab():
            count += 1
        return count
    finally:
        capture.release()


class VideoSink:
    """The overlay video at the source's fps and first frame's size (later frames resized to it).

    MPEG-4 Part 2 (`mp4v`, `MJPG` in .avi): OpenCV's wheels cannot write H.264.
    """

    def __init__(self, path: Path, fps: float) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.fps = fps
        self.fourcc = _fourcc(self.path)
        self.frames = 0  # handed to the writer
        self.written: int | None = None  # counted in the finished file by `finish`
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
            self._writer = cv2.VideoWriter(str(self.partial), code, self.fps, self._size)
            if not self._writer.isOpened():
                raise OutputError(f"--out {self.path}: cannot open a {width}x{height} video")
        elif (width, height) != self._size:
            rgb = cv2.resize(rgb, self._size, interpolation=cv2.INTER_AREA)
            self.resized += 1
        self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def release(self) -> None:
        """Finish the temporary file (an MP4's index is written here); safe to call twice."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def finish(self) -> None:
        """Release, then count the frames that reached the file: OutputError when some did not
        (OpenCV's writer reports no failed write: a full disk shows only here)."""
        self.release()
        if self.frames == 0:
            return
        self.written = count_video_frames(self.partial, self.frames)
        if self.written != self.frames:
            free = shutil.disk_usage(self.path.parent).free / 1e6
            raise OutputError(
                f"--out {self.path}: only {self.written} of {self.frames} frames reached the "
                f"file ({free:.0f} MB free on its disk); nothing was replaced"
            )

    def commit(self) -> None:
        if self.frames:
            os.replace(self.partial, self.path)

    def discard(self) -> None:
        self.release()
        self.partial.unlink(missing_ok=True)


class LabelWriter:
    """`DIR/{index:06d}.png`: each frame's trainIds at the frame's own size, as single channel.

    Written into `DIR/.partial-PID/` and moved into DIR by `commit`, which also removes the frame
    label files of an earlier stream that this one did not write (`--force` replaces them)."""

    def __init__(self, directory: Path) -> None:
        existed = Path(directory).is_dir()
        self.directory = writable_directory(directory, "--labels-dir")
        self._created = not existed
        self.staging = self.directory / f".partial-{os.getpid()}"
        self.staging.mkdir(exist_ok=True)
        self.written = 0

    def write(self, index: int, labels: np.ndarray) -> None:
        path = self.staging / f"{index:06d}.png"
        if not cv2.imwrite(str(path), labels, _PNG):
            raise OSError(f"--labels-dir {self.directory}: cannot write {path.name}")
        self.written += 1

    def commit(self) -> None:
        new = {p.name for p in self.staging.iterdir()}
        for old in existing_frame_labels(self.directory):
            if old.name not in new:
                old.unlink()
        for name in sorted(new):
            os.replace(self.staging / name, self.directory / name)
        self.staging.rmdir()

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._created and not any(self.directory.iterdir()):
            self.directory.rmdir()


class StatsWriter:
    """One JSON line per frame, flushed at once: a killed stream leaves only complete lines (in
    the temporary file)."""

    def __init__(self, path: Path, classes: list[str]) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.classes = list(classes)
        self.lines = 0  # frame lines
        self.check(self.path)
        try:
            self._file: IO[str] | None = self.partial.open("w", encoding="utf-8")
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
        record = {
            "index": index,
            "timestamp": round(timestamp, 6),
            "latency": round(latency, 6),
            "infer": round(infer, 6),
            "presence": {
                c: round(float(p), 4) for c, p in zip(self.classes, presence, strict=True)
            },
        }
        self._line(record)
        self.lines += 1

    def write_event(self, event: dict[str, Any]) -> None:
        """An adaptation event line: {"event": kind, "frame": index, ...}."""
        self._line(event)

    def _line(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            raise OSError(f"--stats {self.path}: cannot write ({exc.strerror or exc})") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def commit(self) -> None:
        self.close()
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        try:
            self.close()
        finally:
            self.partial.unlink(missing_ok=True)


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


class StreamOutputs:
    """The stream's sinks, opened together; `finish` verifies and renames them all into place,
    `discard` removes every temporary file. The window opens first: when it cannot, no file has
    been opened."""

    def __init__(
        self,
        out: Path | None,
        labels_dir: Path | None,
        stats: Path | None,
        show: bool,
        alpha: float,
        fps: float,
        classes: list[str],
        palette: np.ndarray,
    ) -> None:
        self.window: Window | None = None
        self.video: VideoSink | None = None
        self.labels: LabelWriter | None = None
        self.stats: StatsWriter | None = None
        try:
            self.window = Window() if show else None
            self.video = VideoSink(out, fps) if out else None
            self.labels = LabelWriter(labels_dir) if labels_dir else None
            self.stats = StatsWriter(stats, classes) if stats else None
        except BaseException:
            self.discard()
            raise
        self.table = colour_table(palette)
        self.alpha = alpha
        named = {"overlay": out, "labels": labels_dir, "stats": stats}
        self.paths = {name: str(path) for name, path in named.items() if path is not None}

    def write(self, frame_index: int, timestamp: float, image: np.ndarray, segmentation: Any,
              latency: float, infer: float) -> bool:  # fmt: skip
        """Write one frame everywhere; False when the window asks to stop."""
        if self.labels:
            self.labels.write(frame_index, segmentation.labels)
        if self.stats:
            self.stats.write(frame_index, timestamp, latency, infer, segmentation.presence)
        if self.video or self.window:
            blended = overlay(image, segmentation.labels, self.table, self.alpha)
            if self.video:
                self.video.write(blended)
            if self.window:
                return self.window.show(blended)
        return True

    def events(self, events: list[dict[str, Any]]) -> None:
        """Adaptation events into the stats file (if any)."""
        if self.stats:
            for event in events:
                self.stats.write_event(event)

    def written(self) -> dict[str, int]:
        """Frames in each output: counted in the video file, files and lines written."""
        counts = {}
        if self.video and self.video.written is not None:
            counts["overlay"] = self.video.written
        if self.labels:
            counts["labels"] = self.labels.written
        if self.stats:
            counts["stats"] = self.stats.lines
        return counts

    def finish(self) -> None:
        """Verify the video, then rename every output into place (nothing renamed on error)."""
        self._close_window()
        try:
            if self.video:
                self.video.finish()
            if self.stats:
                self.stats.close()
        except BaseException:
            self.discard()
            raise
        for sink in (self.video, self.stats, self.labels):
            if sink is not None:
                sink.commit()

    def discard(self) -> None:
        """Remove every temporary file; what was at the outputs' paths before stays."""
        self._close_window()
        for sink in (self.video, self.stats, self.labels):
            if sink is not None:
                sink.discard()

    def _close_window(self) -> None:
        if self.window:
            self.window.close()
            self.window = None


def check_writable(out: Path | None, labels_dir: Path | None, stats: Path | None) -> None:
    """Fail before any frame is processed when one of the outputs cannot be written."""
    if out is not None:
        VideoSink.check(out)
    if labels_dir is not None:
        creatable_directory(labels_dir, "--labels-dir")
    if stats is not None:
        StatsWriter.check(stats)

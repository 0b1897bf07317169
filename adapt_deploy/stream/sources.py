"""Frame sources of `adapt-deploy stream`: video files, cameras, network streams, image folders.

Every source yields RGB uint8 (H, W, 3) frames (gray, 16-bit and 4-channel inputs converted) with
their index in the source and a timestamp. Files and folders are read frame by frame to their
end, unreadable frames skipped and counted; live sources (cameras, rtsp://, http(s):// URLs) are
reopened with backoff when they drop.
"""

from __future__ import annotations

import glob
import re
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapt_deploy.errors import UserError
from adapt_deploy.stream.destinations import Inputs
from adapt_deploy.stream.opencv import cv2

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
MAX_BAD_RUN = 50  # consecutive undecodable frames after which a file is taken to end there
DEFAULT_FOLDER_FPS = 10.0
_NETWORK_TIMEOUTS_MS = (10_000, 5_000)  # open, read: a dead stream errors instead of hanging
# Box types that may open an MP4/MOV file (ISO/IEC 14496-12 and QuickTime top-level boxes).
MP4_FIRST_BOXES = {b"ftyp", b"styp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot",
                   b"uuid", b"sidx", b"moof", b"pdin", b"meta"}  # fmt: skip


class SourceError(UserError):
    """A stream source that does not exist or cannot be opened."""


@dataclass
class Frame:
    """One decoded frame and where it came from."""

    index: int  # position in the source; skipped and dropped frames keep their numbers
    timestamp: float  # seconds: position in a file or folder, time since start for live sources
    image: np.ndarray  # RGB uint8 (H, W, 3)
    captured: float  # time.perf_counter() when decoded, the start of its latency


def to_rgb(image: np.ndarray) -> np.ndarray | None:
    """An OpenCV (BGR-ordered) image as RGB uint8 HxWx3; gray, 16-bit and BGRA accepted."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0:
        return None
    channels = 1 if image.ndim == 2 else image.shape[2]
    codes = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}
    if channels not in codes:
        return None
    return cv2.cvtColor(image, codes[channels])


class Source:
    """Base of the sources: what the pipeline reads and reports."""

    live = False

    def __init__(self, name: str, fps: float, total: int | None) -> None:
        self.name = name
        self.fps = fps  # nominal frame rate, for timestamps and the overlay video
        self.total = total  # frames a finite source lists (None: live or unknown)
        self.skipped = 0  # frames that could not be decoded
        self.reconnects = 0
        self.lost = False  # a live source that did not come back within its timeout
        self.inputs = Inputs()  # the files and folders it reads: outputs must not touch them

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        """Frames until the source ends or `stop` is set."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the device or file."""


class VideoFile(Source):
    """A video file, every frame in order; a frame that does not decode is skipped and counted."""

    def __init__(self, path: Path, fps: float | None = None) -> None:
        self.path = Path(path)
        self._capture = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        if not self._capture.isOpened():
            raise SourceError(f"cannot open the video {self.path}: {_why_unreadable(self.path)}")
        listed = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT))
        nominal = self._capture.get(cv2.CAP_PROP_FPS)
        super().__init__(str(self.path), nominal if nominal > 0 else fps or 30.0, None)
        self.total = listed if listed > 0 else None
        self.inputs = Inputs(files=(self.path,))

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        index, bad_run = 0, 0
        while not stop.is_set():
            ok, bgr = self._capture.read()
            rgb = to_rgb(bgr) if ok and bgr is not None else None
            if rgb is not None:
                bad_run = 0
                yield Frame(index, index / self.fps, rgb, time.perf_counter())
            elif self.total is None or index >= self.total:
                return  # the end: past the frames the container lists
            else:  # a damaged frame inside the file: the decoder goes on with the next one
                bad_run += 1
                self.skipped += 1
                if bad_run >= MAX_BAD_RUN:  # the file was cut: the rest of its frames are gone
                    self.skipped += self.total - index - 1
                    return
            index += 1

    def close(self) -> None:
        self._capture.release()


class LiveStream(Source):
    """A camera index or a network URL; reopened with exponential backoff when it drops."""

    live = True

    def __init__(
        self, target: int | str, fps: float | None = None, reconnect_timeout: float = 30.0
    ) -> None:
        self.target = target
        self.reconnect_timeout = reconnect_timeout
        name = f"camera {target}" if isinstance(target, int) else str(target)
        self._capture = self._open()
        if self._capture is None:
            what = (
                "no camera with that index (or it is busy)"
                if isinstance(target, int)
                else ("nothing answers there, or not with a video stream")
            )
            raise SourceError(f"cannot open {name}: {what}")
        nominal = self._capture.get(cv2.CAP_PROP_FPS)
        super().__init__(name, nominal if 0 < nominal <= 240 else fps or 30.0, None)

    def _open(self) -> cv2.VideoCapture | None:
        if isinstance(self.target, int):
            capture = cv2.VideoCapture(self.target)
        else:
            open_ms, read_ms = _NETWORK_TIMEOUTS_MS
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, open_ms]
            params += [cv2.CAP_PROP_READ_TIMEOUT_MSEC, read_ms]
            capture = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, params)
        if capture.isOpened():
            return capture
        capture.release()
        return None

    def _reopen(self, stop: threading.Event) -> cv2.VideoCapture | None:
        """Try again after 0.25, 0.5, 1, ... 8 s until it opens, `stop` or the timeout."""
        delay, deadline = 0.25, time.monotonic() + self.reconnect_timeout
        while not stop.wait(delay):
            capture = self._open()
            if capture is not None:
                self.reconnects += 1
                return capture
            if time.monotonic() >= deadline:
                self.lost = True
                return None
            delay = min(2 * delay, 8.0, max(deadline - time.monotonic(), 0.05))
        return None

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        start, index = time.perf_counter(), 0
        while not stop.is_set() and self._capture is not None:
            ok, bgr = self._capture.read()
            rgb = to_rgb(bgr) if ok and bgr is not None else None
            if rgb is not None:
                now = time.perf_counter()
                yield Frame(index, now - start, rgb, now)
                index += 1
            elif ok:
                self.skipped += 1
            else:
                self._capture.release()
                self._capture = self._reopen(stop)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()


class ImageFiles(Source):
    """Still images in natural order (frame_2 before frame_10); unreadable ones are skipped."""

    def __init__(
        self, paths: list[Path], name: str, fps: float | None = None, folder: Path | None = None
    ) -> None:
        super().__init__(name, fps or DEFAULT_FOLDER_FPS, len(paths))
        self.paths = paths
        self.inputs = Inputs(tuple(paths), (folder,) if folder is not None else ())

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        for index, path in enumerate(self.paths):
            if stop.is_set():
                return
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            rgb = to_rgb(image) if image is not None else None
            if rgb is None:
                self.skipped += 1
                continue
            yield Frame(index, index / self.fps, rgb, time.perf_counter())


def open_source(spec: str, fps: float | None = None, reconnect_timeout: float = 30.0) -> Source:
    """The source `spec` names: a camera index, a URL, a video file, an image folder or a glob."""
    if spec.isdigit():
        return LiveStream(int(spec), fps, reconnect_timeout)
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else None
    if scheme in LIVE_SCHEMES:
        return LiveStream(spec, fps, reconnect_timeout)
    if scheme not in (None, "file"):
        raise SourceError(
            f"SOURCE {spec!r}: unknown scheme {scheme}://; expected one of "
            f"{', '.join(s + '://' for s in LIVE_SCHEMES)}, a camera index, a file or a folder"
        )
    path = Path(spec.removeprefix("file://"))
    if path.is_dir():
        return ImageFiles(_images(sorted(path.iterdir()), spec), spec, fps, folder=path)
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return ImageFiles([path], spec, fps)
        return VideoFile(path, fps)
    if glob.has_magic(spec):
        return ImageFiles(_images([Path(p) for p in glob.glob(spec)], spec), spec, fps)
    raise SourceError(
        f"SOURCE {spec!r}: no such file or directory; expected a video file, a camera index, "
        "an rtsp:// or http(s):// URL, an image folder or a glob such as 'frames/*.png'"
    )


def _images(paths: list[Path], spec: str) -> list[Path]:
    """The image files among `paths`, in natural order; SourceError when there are none."""
    images = [p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise SourceError(
            f"SOURCE {spec!r} holds no images (expected files ending in "
            f"{', '.join(IMAGE_SUFFIXES)})"
        )
    return sorted(images, key=_natural_key)


def _natural_key(path: Path) -> list[int | str]:
    """Sort key that orders embedded numbers by value."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _why_unreadable(path: Path) -> str:
    """The likely reason a video file does not open, for the error message."""
    if path.stat().st_size == 0:
        return "the file is empty"
    mp4 = path.suffix.lower() in (".mp4", ".m4v", ".mov")
    if mp4 and not _starts_like_mp4(path):
        return (
            f"not an MP4 file: it does not begin with an MP4 box despite its {path.suffix} name "
            "(a renamed file of another kind?)"
        )
    if mp4 and not _has_moov(path):
        return (
            "this MP4 has no index (moov atom): it was cut short before its writer finished, "
            "and no decoder can open it; write .mkv or .avi where recordings may be cut"
        )
    return "not a video format or codec that this OpenCV's FFmpeg can decode"


def _starts_like_mp4(path: Path) -> bool:
    """Whether the file begins with a plausible MP4 box header (size and a known box type)."""
    with path.open("rb") as f:
        header = f.read(8)
    if len(header) < 8:
        return False
    size, kind = struct.unpack(">I4s", header)
    return kind in MP4_FIRST_BOXES and (size in (0, 1) or size >= 8)


def _has_moov(path: Path) -> bool:
    """Whether the top-level boxes of an MP4 include its index."""
    with path.open("rb") as f:
        while header := f.read(8):
            if len(header) < 8:
                return False
            size, kind = struct.unpack(">I4s", header)
            if kind == b"moov":
                return True
            if size == 1:
                size = struct.unpack(">Q", f.read(8))[0] - 8
            if size < 8:
                return False
            f.seek(size - 8, 1)
    return False

"""Segmenter: a bundle's model behind one call, `seg(frame) -> Segmentation`.

Frames are RGB uint8 (H, W, 3) at any size; grey (H, W) / (H, W, 1) and RGBA (H, W, 4) frames
are converted (see `frames`). A frame whose size lies inside the bundle's shape range
(meta.json `shapes`, min..max) runs at its own size; others, or all frames when `size` is
given, are resized bilinearly to the nearest size in range and the labels are mapped back
(nearest) to the frame's own size. Imports neither torch nor OpenCV; backends are imported
when opened.

Thread safety: calls on one Segmenter are serialized by a lock (its buffers are reused), so it
may be shared between threads but runs one inference at a time; for parallel inference open
one Segmenter per thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapt_deploy.bundle.meta import load_meta
from adapt_deploy.errors import UserError
from adapt_deploy.runtime.backend import Backend, Shape, ShapeCache
from adapt_deploy.runtime.frames import FrameError, as_image, graph_input, write_image
from adapt_deploy.runtime.resize import fit_size, resize_nearest
from adapt_deploy.runtime.selection import Choice, open_backend, parse_device, resolve


@dataclass
class Segmentation:
    """One frame's result."""

    labels: np.ndarray  # (H, W) uint8 trainIds at the input frame's own size
    presence: np.ndarray  # (C,) float32 in [0, 1]: sigmoid of LSE pooling per class
    timings: dict[str, float]  # seconds: "preprocess", "infer", "postprocess", "total"


class Segmenter:
    """A loaded bundle on one backend; see the module docstring. Open with `from_bundle`."""

    def __init__(
        self,
        backend: Backend,
        meta: dict[str, Any],
        bundle: Path,
        size: tuple[int, int] | None = None,
        notes: tuple[str, ...] = (),
    ) -> None:
        if meta["num_classes"] > 256:
            raise UserError(f"{bundle}: {meta['num_classes']} classes do not fit uint8 labels")
        self.bundle = Path(bundle)
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.palette = np.asarray(meta["palette"], np.uint8).reshape(-1, 3)
        self.backend: str = backend.name
        self.precision: str = backend.precision
        self.device: str = backend.device
        self._choice_notes = tuple(notes)  # why "auto" passed over other backends
        shapes = meta["shapes"]
        self.max_batch: int = shapes["max"][0]
        self.min_size: tuple[int, int] = (shapes["min"][1], shapes["min"][2])
        self.max_size: tuple[int, int] = (shapes["max"][1], shapes["max"][2])
        self.size = self._check_size(size)
        self._impl: Backend | None = backend
        self._input_meta = meta["input"]
        self._nchw = meta["input"]["layout"] == "NCHW"
        self._staging: ShapeCache[np.ndarray] = ShapeCache(lambda s: np.empty((*s, 3), np.uint8))
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        backend: str = "auto",
        device: int | str = 0,
        precision: str = "auto",
        *,
        size: tuple[int, int] | None = None,
        threads: int | None = None,
        check_hashes: bool = True,
        cuda_graph: bool | None = None,
    ) -> Segmenter:
        """Open a bundle. backend: "auto" | "onnxruntime" | "tensorrt" | "torch"; device: a GPU
        index (used when a GPU backend is available, else the CPU), "cuda:N" (required) or
        "cpu"; precision: "auto" | "fp32" | "fp16" | "bf16" (torch only); size: (H, W) to run
        every frame at; threads: ONNX Runtime CPU threads; check_hashes: verify the model's
        sha256 first; cuda_graph: replay CUDA graphs (None: on for torch on CUDA, off for ONNX
        Runtime; ADAPT_DEPLOY_CUDA_GRAPHS=0 turns them off); see `notes` for what was not
        honoured."""
        bundle = Path(path)
        meta = load_meta(bundle)
        choice: Choice = resolve(bundle, meta, backend, precision, parse_device(device), cuda_graph)
        impl = open_backend(bundle, meta, choice, threads=threads, check_hashes=check_hashes)
        return cls(impl, meta, bundle, size=size, notes=choice.notes)

    @property
    def notes(self) -> tuple[str, ...]:
        """Why "auto" passed over a backend, requests that were not honoured (a CUDA graph on
        the CPU), and what the running backend turned off since (a graph that failed to
        capture: eager runs instead)."""
        impl = self._impl
        return self._choice_notes + tuple(impl.notes if impl else ())

    def _check_size(self, size: tuple[int, int] | None) -> tuple[int, int] | None:
        if size is None:
            return None
        ok = len(size) == 2 and all(isinstance(v, int | np.integer) for v in size)
        if not ok or fit_size(*size, self.min_size, self.max_size) != tuple(size):
            raise UserError(
                f"size: expected (H, W) within the bundle's range {self.min_size} to "
                f"{self.max_size} ({self.bundle / 'meta.json'} shapes), got {size!r}"
            )
        return int(size[0]), int(size[1])

    def inference_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) a frame of this size runs at."""
        return self.size or fit_size(height, width, self.min_size, self.max_size)

    def __call__(self, frame: np.ndarray) -> Segmentation:
        """Segment one RGB uint8 (H, W, 3) frame (grey and RGBA are converted)."""
        with self._lock:
            image = as_image(frame, "frame")
            return self._run([image], self.inference_size(*image.shape[:2]))[0]

    def batch(self, frames: list[np.ndarray]) -> list[Segmentation]:
        """Segment several frames, in order. Frames of one inference size run together, up to
        the bundle's max batch per call; a result's `infer` is its share of its call's time."""
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            frames = list(frames)
        if not isinstance(frames, list | tuple):
            raise FrameError(f"frames: expected a list of frames, got {type(frames).__name__}")
        with self._lock:
            images = [as_image(f, f"frames[{i}]") for i, f in enumerate(frames)]
            groups: dict[tuple[int, int], list[int]] = {}
            for i, image in enumerate(images):
                groups.setdefault(self.inference_size(*image.shape[:2]), []).append(i)
            results: list[Segmentation | None] = [None] * len(images)
            for size, indices in groups.items():
                for start in range(0, len(indices), self.max_batch):
                    chunk = indices[start : start + self.max_batch]
                    outs = self._run([images[i] for i in chunk], size)
                    for i, result in zip(chunk, outs, strict=True):
                        results[i] = result
            return [r for r in results if r is not None]

    def _run(self, images: list[np.ndarray], size: tuple[int, int]) -> list[Segmentation]:
        """One backend call on up to max_batch images of one inference size."""
        impl = self._impl
        if impl is None:
            raise UserError("this Segmenter is closed")
        shape: Shape = (len(images), *size)
        start = time.perf_counter()
        staging = self._staging.get(shape) if self._nchw else impl.input_buffer(shape)
        for slot, image in zip(staging, images, strict=True):
            write_image(slot, image)
        if self._nchw:
            graph_input(staging, self._input_meta, out=impl.input_buffer(shape))
        ready = time.perf_counter()
        labels, presence = impl.run(shape)
        done = time.perf_counter()
        preprocess, infer = (ready - start) / len(images), (done - ready) / len(images)
        results = []
        for i, image in enumerate(images):
            began = time.perf_counter()
            frame_labels = labels[i].astype(np.uint8)
            if frame_labels.shape != image.shape[:2]:
                frame_labels = resize_nearest(frame_labels, *image.shape[:2])
            post = time.perf_counter() - began
            timings = {"preprocess": preprocess, "infer": infer, "postprocess": post}
            timings["total"] = preprocess + infer + post
            results.append(Segmentation(frame_labels, presence[i].copy(), timings))
        return results

    def current_backend(self) -> Backend:
        """The backend that runs the next call (UserError once the segmenter is closed): what
        on-device adaptation copies its settings from and checks a replacement against."""
        impl = self._impl
        if impl is None:
            raise UserError("this Segmenter is closed")
        return impl

    def swap_backend(self, new: Backend) -> Backend:
        """Run `new` (same backend kind, precision and device) from the next call on and return
        the one it replaces, for the caller to close or keep. The swap happens between two calls
        (under the lock), so on-device adaptation can push checked weights without a gap."""
        current = (self.backend, self.precision, self.device)
        if (new.name, new.precision, new.device) != current:
            raise ValueError(
                f"swap_backend: expected a {current[0]} backend ({current[1]}, {current[2]}), "
                f"got {new.name} ({new.precision}, {new.device})"
            )
        with self._lock:
            old = self._impl
            if old is None:
                raise UserError("this Segmenter is closed")
            self._impl = new
        return old

    def close(self) -> None:
        """Release the backend (sessions, engines, device memory); later calls fail."""
        with self._lock:
            if self._impl is not None:
                self._impl.close()
                self._impl = None
            self._staging.clear()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Segmenter({self.bundle}, backend={self.backend}, precision={self.precision}, "
            f"device={self.device}, classes={len(self.classes)})"
        )

"""What every inference backend provides to the Segmenter, and helpers they share.

A backend owns the graph's input buffer and its output buffers. The Segmenter asks it for the
host input buffer of a batch shape (N, H, W), writes the frames there, then calls `run(shape)`,
which returns views of the `labels` (N, H, W) int32 and `presence` (N, C) float32 outputs that
stay valid until the next call. Buffers are allocated once per shape (ONNX Runtime, torch) or
once for the engine profile's largest shape (TensorRT). `notes` says what a backend turned off
while running (a CUDA graph that failed to capture), which `Segmenter.notes` reports.
`as_runner` adapts any backend to the batch-in, named-outputs-out form that verify and the
on-device sync check samples with.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

Shape = tuple[int, int, int]  # (N, H, W)
T = TypeVar("T")


class Backend(Protocol):
    """One loaded model on one device; not thread-safe (the Segmenter serializes calls)."""

    name: str  # "onnxruntime" | "tensorrt" | "torch"
    precision: str  # "fp32" | "fp16" | "bf16" (torch only)
    device: str  # "cpu" | "cuda:N"
    cuda_graph: bool  # replays CUDA graphs (a replacement backend is made alike)
    notes: list[str]  # what it turned off while running, for Segmenter.notes

    def input_buffer(self, shape: Shape) -> np.ndarray:
        """The host buffer the graph reads for a batch of `shape`, in the graph's layout."""
        ...

    def run(self, shape: Shape) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph on the input buffer; (labels, presence) views until the next call."""
        ...

    def close(self) -> None:
        """Release the model and its buffers (device memory included)."""
        ...


def graph_shape(shape: Shape, layout: str) -> tuple[int, int, int, int]:
    """The input tensor's shape for a batch (N, H, W): (N, H, W, 3) or (N, 3, H, W)."""
    n, h, w = shape
    return (n, h, w, 3) if layout == "NHWC" else (n, 3, h, w)


def input_dtype(layout: str) -> type[np.generic]:
    """uint8 frames for NHWC bundles, normalized float32 for NCHW ones."""
    return np.uint8 if layout == "NHWC" else np.float32


class ShapeCache(Generic[T]):
    """Per-shape resources (buffers, bindings, CUDA graphs), made on first use; the least
    recently used is dropped past `size` shapes, so a stream of changing sizes cannot grow
    without bound. Keys are shapes of any rank."""

    def __init__(self, make: Callable[[Any], T], size: int = 4) -> None:
        self._make = make
        self._size = size
        self._items: OrderedDict[tuple[int, ...], T] = OrderedDict()

    def get(self, shape: tuple[int, ...]) -> T:
        if shape in self._items:
            self._items.move_to_end(shape)
        else:
            self._items[shape] = self._make(shape)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return self._items[shape]

    def items(self) -> list[tuple[tuple[int, ...], T]]:
        """The cached (shape, resource) pairs, least recently used first."""
        return list(self._items.items())

    def values(self) -> list[T]:
        return list(self._items.values())

    def clear(self) -> None:
        self._items.clear()


def as_runner(backend: Backend, layout: str) -> Callable[[np.ndarray], dict[str, Any]]:
    """A verify-style Runner (graph input batch -> named outputs) over a backend."""

    def run(batch: np.ndarray) -> dict[str, Any]:
        n = batch.shape[0]
        shape = (n, *batch.shape[1:3]) if layout == "NHWC" else (n, *batch.shape[2:4])
        backend.input_buffer(shape)[...] = batch
        labels, presence = backend.run(shape)
        return {"labels": labels.copy(), "presence": presence.copy()}

    return run

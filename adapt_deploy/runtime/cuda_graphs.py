"""A pure inference forward on static buffers, replayed from a CUDA graph per input shape.

`GraphedForward(fn, device, dtype, graphs)` keeps one static input tensor per input shape
(the last few shapes). `run(shape)` runs `fn` on it: eagerly, or, with `graphs` on a CUDA
device, by replaying a graph captured on the shape's first run. The capture follows PyTorch's
recipe (warm-up on a side stream, then `torch.cuda.graph`) with `capture_error_mode=
"thread_local"`, so another thread using the GPU meanwhile (the stream's inference beside the
adapter) is not disturbed. The first replay is compared with the warm-up's eager outputs
(`graph_policy.replay_mismatch`); a capture that raises or disagrees turns graphs off for this
forward, adds a note to `notes` and warns, and that call returns the eager outputs.

A graph reads the addresses it was captured with: the static input, and the module's
parameters and buffers. Writing those in place (`copy_`, `load_state_dict`, `_foreach_lerp_`)
is seen by the next replay; replacing a tensor object is not. Outputs of a replay are the
graph's own tensors, overwritten by the next replay of that shape: copy what must outlive it.

Imported by torch users only (the torch backend, the adapter).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adapt_deploy.runtime.backend import ShapeCache
from adapt_deploy.runtime.graph_policy import replay_mismatch

InputShape = tuple[int, ...]
WARMUP_RUNS = 2  # eager runs before capture: lazy initialization, cuDNN / kernel choices


@dataclass
class _Slot:
    """One input shape: its static input and, once captured, its graph and output tensors."""

    input: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    outputs: tuple[torch.Tensor, ...] = ()


def _as_tuple(out: object) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, Sequence) and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(out)
    raise TypeError(f"the forward must return a tensor or a tuple of tensors, got {type(out)}")


def _host(outputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """Outputs as numpy on the host (floats as float32: numpy has no bfloat16)."""
    return [(t.float() if t.is_floating_point() else t).cpu().numpy() for t in outputs]


class GraphedForward:
    """See the module docstring. Not thread-safe: one caller at a time (the Segmenter's lock,
    the adapter's thread)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], object],
        device: torch.device | str,
        dtype: torch.dtype,
        graphs: bool,
        shapes: int = 4,
        who: str = "torch",
    ) -> None:
        self.device = torch.device(device)
        if graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        self.graphs = graphs  # False once a capture failed: eager from then on
        self.notes: list[str] = []
        self._fn = fn
        self._dtype = dtype
        self._who = who
        self._slots: ShapeCache[_Slot] = ShapeCache(self._slot, size=shapes)

    def _slot(self, shape: InputShape) -> _Slot:
        return _Slot(torch.empty(shape, dtype=self._dtype, device=self.device))

    @property
    def captured(self) -> list[InputShape]:
        """The input shapes that replay a graph now."""
        return [s for s, slot in self._slots.items() if slot.graph is not None]

    def input(self, shape: InputShape) -> torch.Tensor:
        """The static input of `shape`: write the batch here, then `run(shape)`."""
        return self._slots.get(tuple(shape)).input

    def run(self, shape: InputShape) -> tuple[torch.Tensor, ...]:
        """`fn` on the static input of `shape` (on the current CUDA stream)."""
        slot = self._slots.get(tuple(shape))
        if slot.graph is not None:
            slot.graph.replay()
            return slot.outputs
        if self.graphs:
            return self._capture(slot, tuple(shape))
        return self._eager(slot.input)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Copy `x` into its static input and run."""
        shape = tuple(x.shape)
        self.input(shape).copy_(x)
        return self.run(shape)

    def close(self) -> None:
        """Drop the graphs and buffers."""
        self._slots.clear()

    def _eager(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return _as_tuple(self._fn(x))

    def _capture(self, slot: _Slot, shape: InputShape) -> tuple[torch.Tensor, ...]:
        """Warm up, capture, replay once and compare with eager; eager (and a note) on failure."""
        try:
            with torch.cuda.device(self.device):
                current = torch.cuda.current_stream()
                side = torch.cuda.Stream()
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_RUNS):
                        eager = self._eager(slot.input)
                current.wait_stream(side)
                for tensor in eager:  # made on `side`, read on `current` from here on
                    tensor.record_stream(current)
                expected = _host(eager)
                graph = torch.cuda.CUDAGraph()
                # captured on `side` (this device's; torch's shared default capture stream is
                # made on whichever device first captures), replayed on `current`
                capture = torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local")
                with torch.no_grad(), capture:
                    outputs = _as_tuple(self._fn(slot.input))
                graph.replay()
                problem = replay_mismatch(expected, _host(outputs))
        except Exception as exc:  # any capture failure: eager is still right
            why = f"{type(exc).__name__}: {exc}"
            self._give_up(f"capturing input shape {list(shape)} failed ({why})")
            return self._eager(slot.input)
        if problem is not None:
            self._give_up(f"the graph of input shape {list(shape)} differs from eager: {problem}")
            return eager
        slot.graph, slot.outputs = graph, outputs
        return outputs

    def _give_up(self, why: str) -> None:
        """Graphs off for this forward from now on, said in `notes` and as a warning."""
        self.graphs = False
        for slot in self._slots.values():
            slot.graph, slot.outputs = None, ()
        note = f"{self._who}: CUDA graphs off, running eager: {why}"
        self.notes.append(note)
        warnings.warn(note, RuntimeWarning, stacklevel=3)

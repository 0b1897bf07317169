"""TensorRT backend: this machine's engine from the bundle, run with execute_async_v3.

One execution context, one non-default CUDA stream, and every input/output tensor allocated
once on the device for the optimization profile's largest shape (its addresses are set once);
the input and the labels/presence outputs also get pinned host buffers of that size. A call
sets the input shape, copies the input up, enqueues the engine, copies the two outputs down
and synchronizes the stream. The engine is loaded through `read_engine`, which refuses one
built for another TensorRT version or GPU and checks its sha256.

A tensor whose shape at the max input shape still has a -1 (data-dependent) dim is never
allocated from that shape: an output the backend does not read is sized by TensorRT's own
upper bound (IExecutionContext.get_max_output_size), and the input, labels and presence (read
back by shape after each run) are refused with an EngineError naming the tensor.

NOT RUN: written against the TensorRT 10.x / 11.x Python API (Runtime.deserialize_cuda_engine,
ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype,
IExecutionContext.set_input_shape / get_tensor_shape / get_max_output_size /
set_tensor_address / execute_async_v3) and cuda-python's runtime bindings. TensorRT cannot be
installed on our machines (no GPU); tests cover the selection logic, the allocation sizes and
the errors around them with stand-ins for the engine and context.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from adapt_deploy.bundle.engine_files import EngineError, read_engine
from adapt_deploy.bundle.platform import detect_platform, import_tensorrt
from adapt_deploy.runtime.backend import Shape, graph_shape
from adapt_deploy.runtime.cuda_memory import open_memory


def check_in_profile(shape: tuple[int, ...], profile: dict[str, list[int]], plan: str) -> None:
    """EngineError when an input shape is outside the engine's optimization profile."""
    low, high = list(profile["min"]), list(profile["max"])
    inside = len(shape) == len(low) == len(high) and all(
        a <= s <= b for a, s, b in zip(low, shape, high, strict=True)
    )
    if not inside:
        raise EngineError(
            f"{plan}: input shape {list(shape)} is outside the engine's profile "
            f"(min {low}, max {high}); the Segmenter resizes frames into the bundle's range, "
            "so the engine was built for other shape ranges: rebuild it with build-engine"
        )


class TensorRTBackend:
    """A bundle's TensorRT engine on CUDA device `device` (see the module docstring)."""

    name = "tensorrt"

    def __init__(self, bundle: Path, meta: dict[str, Any], precision: str, device: int = 0):
        trt = import_tensorrt()  # TensorRTMissingError with the install hint
        here = detect_platform(trt.__version__, device)
        plan, record = read_engine(bundle, meta, precision, here)  # refuses foreign engines
        self.precision = precision
        self.device = f"cuda:{device}"
        self.cuda_graph = False  # execute_async_v3 per call; TensorRT's own graphs are not used
        self.notes: list[str] = []
        self._plan = record.engine
        self._layout = meta["input"]["layout"]
        self._input = record.input_name
        self._profile = record.profile
        self._engine: Any = None
        self._context: Any = None
        self._memory = open_memory(device)
        try:
            self._memory.activate()  # TensorRT deserializes onto the current device
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise EngineError(f"{record.engine}: TensorRT could not deserialize the plan")
            self._context = self._engine.create_execution_context()
            self._allocate(trt, tuple(self._profile["max"]))
        except BaseException:  # the stream and whatever was allocated go back now
            with contextlib.suppress(Exception):  # the first error is the one to report
                self.close()
            raise

    def _allocate(self, trt: Any, max_shape: tuple[int, ...]) -> None:
        """Device memory for every I/O tensor at the profile's max shape; pinned host buffers."""
        if not self._context.set_input_shape(self._input, max_shape):
            raise EngineError(f"{self._plan}: the engine refused its own max shape {max_shape}")
        self._device: dict[str, int] = {}
        self._dtypes: dict[str, np.dtype] = {}
        host_bytes: dict[str, int] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            nbytes = self._tensor_bytes(name, dtype.itemsize)
            self._device[name] = self._memory.device(nbytes)
            self._dtypes[name] = dtype
            if not self._context.set_tensor_address(name, self._device[name]):
                raise EngineError(f"{self._plan}: cannot set the address of tensor {name!r}")
            if name in (self._input, "labels", "presence"):
                host_bytes[name] = nbytes
        missing = {self._input, "labels", "presence"} - set(host_bytes)
        if missing:
            raise EngineError(f"{self._plan}: the engine has no tensor(s) {sorted(missing)}")
        self._host = {
            name: self._memory.host(nbytes).view(self._dtypes[name])
            for name, nbytes in host_bytes.items()
        }

    def _tensor_bytes(self, name: str, itemsize: int) -> int:
        """Bytes of tensor `name` at the max input shape. A -1 dim is data-dependent: an output
        nobody reads back is sized by `IExecutionContext.get_max_output_size` (TensorRT 10: the
        upper bound in bytes for the current profile and input shapes, -1 when unknown); the
        input, labels and presence, or any tensor without that bound, are refused."""
        shape = tuple(self._context.get_tensor_shape(name))
        if all(d >= 0 for d in shape):
            return math.prod(shape) * itemsize
        bound = -1
        if name not in (self._input, "labels", "presence"):
            bound = int(getattr(self._context, "get_max_output_size", lambda _: -1)(name))
        if bound >= 0:
            return bound
        raise EngineError(
            f"{self._plan}: tensor {name!r} has shape {list(shape)} at the profile's max input "
            "shape: a -1 dim is data-dependent and the TensorRT backend can neither size nor "
            "read it back; export the model with output dims that follow from the input shape"
        )

    def input_buffer(self, shape: Shape) -> np.ndarray:
        full = graph_shape(shape, self._layout)
        check_in_profile(full, self._profile, self._plan)
        return self._host[self._input][: math.prod(full)].reshape(full)

    def run(self, shape: Shape) -> tuple[np.ndarray, np.ndarray]:
        full = graph_shape(shape, self._layout)
        check_in_profile(full, self._profile, self._plan)
        memory = self._memory
        memory.activate()
        if not self._context.set_input_shape(self._input, full):
            raise EngineError(f"{self._plan}: the engine refused input shape {full}")
        nbytes = math.prod(full) * self._dtypes[self._input].itemsize
        memory.to_device(self._device[self._input], self._host[self._input], nbytes)
        if not self._context.execute_async_v3(memory.stream):
            raise EngineError(f"{self._plan}: execute_async_v3 failed (TensorRT's log says why)")
        outputs = []
        for name in ("labels", "presence"):
            out_shape = tuple(self._context.get_tensor_shape(name))
            count = math.prod(out_shape)
            host = self._host[name]
            memory.to_host(host, self._device[name], count * host.itemsize)
            outputs.append(host[:count].reshape(out_shape))
        memory.synchronize()
        return outputs[0], outputs[1]

    @property
    def engine(self) -> Any:
        """The deserialized ICudaEngine, for on-device adaptation to refit in place (the
        execution context sees new weights after `refit_cuda_engine`); EngineError once closed."""
        if self._engine is None:
            raise EngineError(f"{self._plan}: this TensorRT backend is closed")
        return self._engine

    def make_current(self) -> None:
        """Make the engine's GPU the current device of this thread (a refit must run there)."""
        self._memory.activate()

    def close(self) -> None:
        self._context = None
        self._engine = None
        self._memory.close()

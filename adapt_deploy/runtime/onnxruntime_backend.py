"""ONNX Runtime backend: CPU or CUDA execution provider, with IO binding to fixed buffers.

Outputs are bound to preallocated host arrays and, on CPU, the input too, so a call allocates
nothing. On CUDA the input lives in a device OrtValue updated in place from the host buffer,
outputs other than labels and presence (logits) stay on the device, and ONNX Runtime copies
labels and presence back into the host arrays. onnxruntime is imported when a session is made,
not with this module. The CUDA path is written against onnxruntime-gpu's documented IO binding
API and has not run here (no GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapt_deploy.errors import UserError
from adapt_deploy.runtime.backend import Shape, ShapeCache, graph_shape, input_dtype

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
GPU_HINT = "install onnxruntime-gpu (and uninstall onnxruntime: they share one module)"


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def cuda_available() -> bool:
    """Whether this onnxruntime has the CUDA execution provider (onnxruntime-gpu)."""
    return CUDA_PROVIDER in available_providers()


def require_cuda(what: str) -> None:
    """UserError naming `what` asked for CUDA when this onnxruntime has no CUDA provider."""
    if not cuda_available():
        raise UserError(
            f"{what}: this onnxruntime has no {CUDA_PROVIDER} (available: "
            f"{available_providers()}); {GPU_HINT}"
        )


def create_session(
    path: Path | bytes, cuda_device: int | None = None, threads: int | None = None
) -> Any:
    """An InferenceSession on CPU, or on CUDA device `cuda_device` with CPU fallback for ops
    the CUDA provider lacks. `threads` caps intra-op CPU threads (default: all cores). `path`
    may also be a serialized model (on-device adaptation pushes updated weights that way)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: fp16 graphs on CPU log cast insertions
    providers: list[Any] = [CPU_PROVIDER]
    if cuda_device is not None:
        require_cuda(f"device cuda:{cuda_device}")
        providers.insert(0, (CUDA_PROVIDER, {"device_id": cuda_device}))
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=providers)


@dataclass
class _Binding:
    """The IO binding of one batch shape and the arrays it points at."""

    io: Any
    host_input: np.ndarray
    device_input: Any  # OrtValue on CUDA, None on CPU
    labels: np.ndarray
    presence: np.ndarray


class OnnxRuntimeBackend:
    """A bundle's ONNX model in one ONNX Runtime session (see the module docstring)."""

    name = "onnxruntime"

    def __init__(
        self,
        model: Path | bytes,
        layout: str,
        num_classes: int,
        precision: str,
        cuda_device: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.session = create_session(model, cuda_device, threads)
        if cuda_device is not None and CUDA_PROVIDER not in self.session.get_providers():
            where = "the serialized model" if isinstance(model, bytes) else model
            raise UserError(
                f"{where}: ONNX Runtime could not start its CUDA provider on device "
                f"{cuda_device} (its log says why: usually missing CUDA or cuDNN libraries)"
            )
        self.precision = precision
        self.device = "cpu" if cuda_device is None else f"cuda:{cuda_device}"
        self._cuda = cuda_device
        self._layout = layout
        self._num_classes = num_classes
        self._input = self.session.get_inputs()[0].name
        self._extra = [o.name for o in self.session.get_outputs()]
        self._extra = [n for n in self._extra if n not in ("labels", "presence")]
        self._bindings: ShapeCache[_Binding] = ShapeCache(self._bind)

    def _bind(self, shape: Shape) -> _Binding:
        host = np.empty(graph_shape(shape, self._layout), input_dtype(self._layout))
        labels = np.empty(shape, np.int32)
        presence = np.empty((shape[0], self._num_classes), np.float32)
        io = self.session.io_binding()
        device_input = None
        if self._cuda is None:
            io.bind_input(self._input, "cpu", 0, host.dtype, list(host.shape), host.ctypes.data)
        else:
            import onnxruntime as ort

            device_input = ort.OrtValue.ortvalue_from_shape_and_type(
                list(host.shape), host.dtype, "cuda", self._cuda
            )
            io.bind_ortvalue_input(self._input, device_input)
        for name, array in (("labels", labels), ("presence", presence)):
            io.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name in self._extra:  # e.g. logits: left where they are computed
            io.bind_output(name, "cpu" if self._cuda is None else "cuda", self._cuda or 0)
        return _Binding(io, host, device_input, labels, presence)

    def input_buffer(self, shape: Shape) -> np.ndarray:
        return self._bindings.get(shape).host_input

    def run(self, shape: Shape) -> tuple[np.ndarray, np.ndarray]:
        binding = self._bindings.get(shape)
        if binding.device_input is not None:
            binding.device_input.update_inplace(binding.host_input)
        self.session.run_with_iobinding(binding.io)
        binding.io.synchronize_outputs()
        return binding.labels, binding.presence

    def close(self) -> None:
        self._bindings.clear()
        self.session = None

"""CUDA memory and one stream for the TensorRT backend: cuda-python, or torch where it is.

Both give the same small interface: device allocations (addresses for
`IExecutionContext.set_tensor_address`), pinned host buffers seen as numpy arrays, async
copies on one non-default stream, and a synchronize. cuda-python (`cuda.bindings.runtime`, as
TensorRT's own samples use) is preferred; torch's CUDA tensors serve where only torch is there.

Addresses of cuda-python objects (the stream TensorRT is given) are read with
`cuda.bindings.utils.get_cuda_native_handle`: cuda-python deprecates `int(obj)` for that (its
docs, "Tips and Tricks"); `int()` remains the fallback for releases without that function.

NOT RUN: written against the cuda-python 12/13 runtime bindings and torch.cuda documentation;
our machines have no GPU. The handle reading is tested with a stand-in cudart module and
stream whose `__int__` warns as cuda-python's does.
"""

from __future__ import annotations

import ctypes
from typing import Any, Protocol

import numpy as np

from adapt_deploy.bundle.platform import (
    INSTALL_HINT,
    TensorRTMissingError,
    error_name,
    import_cudart,
)
from adapt_deploy.runtime.stream_priority import inference_priority


def native_handle(obj: Any) -> int:
    """The address a cuda-python object wraps (a cudaStream_t's handle) as an int: through
    `cuda.bindings.utils.get_cuda_native_handle` where it exists and knows the type, else
    `int(obj)` (older cuda-python, or a plain int already)."""
    if isinstance(obj, int):
        return obj
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:  # cuda-python before the utils module: int() is the only way
        return int(obj)
    try:
        return int(get_cuda_native_handle(obj))
    except TypeError:  # "Unknown type": a type this release registers no getter for
        return int(obj)


class CudaMemory(Protocol):
    stream: int  # the cudaStream_t handle, for execute_async_v3

    def activate(self) -> None: ...  # make the device current on the calling thread
    def device(self, nbytes: int) -> int: ...
    def host(self, nbytes: int) -> np.ndarray: ...  # pinned, flat uint8
    def to_device(self, dst: int, src: np.ndarray, nbytes: int) -> None: ...
    def to_host(self, dst: np.ndarray, src: int, nbytes: int) -> None: ...
    def synchronize(self) -> None: ...
    def close(self) -> None: ...


class CudaPythonMemory:
    """cuda-python: cudaMalloc / cudaMallocHost / cudaMemcpyAsync on a non-blocking stream of
    high priority."""

    def __init__(self, cudart: Any, device: int) -> None:
        self._rt = cudart
        self._device = device
        self._device_ptrs: list[int] = []
        self._host_ptrs: list[int] = []
        self.activate()
        # the runtime's frames first when the adapter's kernels wait too (`stream_priority`)
        self._stream = self._call(
            cudart.cudaStreamCreateWithPriority(cudart.cudaStreamNonBlocking, inference_priority())
        )
        self.stream = native_handle(self._stream)

    def _call(self, result: tuple[Any, ...]) -> Any:
        err, *values = result
        if err != self._rt.cudaError_t.cudaSuccess:
            name = error_name(self._rt, err)
            raise RuntimeError(f"CUDA error on device {self._device}: {name}")
        return values[0] if len(values) == 1 else tuple(values)

    def activate(self) -> None:
        self._call(self._rt.cudaSetDevice(self._device))

    def device(self, nbytes: int) -> int:
        ptr = native_handle(self._call(self._rt.cudaMalloc(max(nbytes, 1))))
        self._device_ptrs.append(ptr)
        return ptr

    def host(self, nbytes: int) -> np.ndarray:
        ptr = native_handle(self._call(self._rt.cudaMallocHost(max(nbytes, 1))))
        self._host_ptrs.append(ptr)
        return np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr))

    def to_device(self, dst: int, src: np.ndarray, nbytes: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self._rt.cudaMemcpyAsync(dst, src.ctypes.data, nbytes, kind, self._stream))

    def to_host(self, dst: np.ndarray, src: int, nbytes: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self._rt.cudaMemcpyAsync(dst.ctypes.data, src, nbytes, kind, self._stream))

    def synchronize(self) -> None:
        self._call(self._rt.cudaStreamSynchronize(self._stream))

    def close(self) -> None:
        self.synchronize()
        for ptr in self._device_ptrs:
            self._rt.cudaFree(ptr)
        for ptr in self._host_ptrs:
            self._rt.cudaFreeHost(ptr)
        self._rt.cudaStreamDestroy(self._stream)
        self._device_ptrs, self._host_ptrs = [], []


class TorchCudaMemory:
    """torch: uint8 CUDA tensors as device memory, pinned CPU tensors, a high-priority
    torch.cuda.Stream."""

    def __init__(self, torch: Any, device: int) -> None:
        self._torch = torch
        self._device = torch.device("cuda", device)
        self._tensors: dict[int, Any] = {}
        self._stream_obj = torch.cuda.Stream(self._device, priority=inference_priority())
        self.stream = int(self._stream_obj.cuda_stream)

    def activate(self) -> None:
        self._torch.cuda.set_device(self._device)

    def device(self, nbytes: int) -> int:
        tensor = self._torch.empty(max(nbytes, 1), dtype=self._torch.uint8, device=self._device)
        self._tensors[tensor.data_ptr()] = tensor
        return tensor.data_ptr()

    def host(self, nbytes: int) -> np.ndarray:
        tensor = self._torch.empty(max(nbytes, 1), dtype=self._torch.uint8, pin_memory=True)
        self._tensors[tensor.data_ptr()] = tensor
        return tensor.numpy()

    def _copy(self, dst: Any, src: Any) -> None:
        with self._torch.cuda.stream(self._stream_obj):
            dst.copy_(src, non_blocking=True)

    def to_device(self, dst: int, src: np.ndarray, nbytes: int) -> None:
        """`src` starts at a buffer from `host` (kept pinned: the copy is truly async)."""
        self._copy(self._tensors[dst][:nbytes], self._tensors[src.ctypes.data][:nbytes])

    def to_host(self, dst: np.ndarray, src: int, nbytes: int) -> None:
        self._copy(self._tensors[dst.ctypes.data][:nbytes], self._tensors[src][:nbytes])

    def synchronize(self) -> None:
        self._stream_obj.synchronize()

    def close(self) -> None:
        self.synchronize()
        self._tensors.clear()


def open_memory(device: int) -> CudaMemory:
    """cuda-python's memory on `device`, else torch's; TensorRTMissingError when neither."""
    cudart = import_cudart()
    if cudart is not None:
        return CudaPythonMemory(cudart, device)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        return TorchCudaMemory(torch, device)
    raise TensorRTMissingError(
        "the TensorRT backend needs cuda-python (pip install cuda-python) or a CUDA build of "
        f"torch to move data to the GPU; {INSTALL_HINT}"
    )

"""Which TensorRT and which GPU this machine has: the half of engine handling that needs
neither torch nor a TensorRT build.

Engines are named by TensorRT version and GPU (bundle/engine_files.py), so both the builder
(export/tensorrt.py) and the runtime's loader ask here. tensorrt and cuda-python are imported
only when asked for, so this module imports on any machine; nvidia-smi is the fallback where
cuda-python is absent. Run here against stand-ins only (tests/test_faults_tensorrt.py: a fake
nvidia-smi on PATH, mapping CUDA's device index to nvidia-smi's and refusing when it cannot).
"""

from __future__ import annotations

import os
import re
import subprocess
from types import ModuleType
from typing import Any

from adapt_deploy.bundle.engine_files import EngineError, Platform
from adapt_deploy.errors import UserError

INSTALL_HINT = (
    "on the target GPU machine: pip install 'adapt-deploy[trt]' (TensorRT and cuda-python from "
    "PyPI), or use the TensorRT that JetPack or NVIDIA's container ships"
)


class TensorRTMissingError(UserError):
    """TensorRT (or a CUDA GPU for it) is not available on this machine."""


def import_tensorrt() -> ModuleType:
    """The tensorrt module, or one clear TensorRTMissingError saying how to install it."""
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or a stub wheel whose libraries are missing
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TensorRTMissingError(
            f"TensorRT is not installed (import tensorrt failed: {reason}); {INSTALL_HINT}"
        ) from None
    return tensorrt


# --------------------------------------------------------------------------------------------
# Which GPU is this
# --------------------------------------------------------------------------------------------


def parse_nvidia_smi(text: str) -> tuple[str, str]:
    """(name, compute capability) from one line of
    `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    name, _, cap = line.rpartition(",")
    name, cap = name.strip(), cap.strip()
    if not name or not re.fullmatch(r"\d+\.\d+", cap):
        raise EngineError(f"cannot read a GPU name and compute capability from {line!r}")
    return name, cap


def import_cudart() -> ModuleType | None:
    """cuda-python's CUDA runtime bindings (either module layout), or None when absent."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python before the cuda.bindings layout
        except ImportError:
            return None
    return cudart


def error_name(cudart: Any, err: Any) -> str:
    """cudaGetErrorName of `err` as text (cuda-python returns it as bytes)."""
    name = cudart.cudaGetErrorName(err)[1]
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def _gpu_from_cuda_python(device: int) -> tuple[str, str] | None:
    """Via cuda-python (what TensorRT's samples use); None when cuda-python is absent."""
    cudart = import_cudart()
    if cudart is None:
        return None
    err, props = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        reason = error_name(cudart, err)
        raise TensorRTMissingError(f"no usable CUDA GPU (cudaGetDeviceProperties: {reason})")
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return str(name).strip(), f"{props.major}.{props.minor}"


_CUDA_UUID = ("GPU-", "MIG-")  # CUDA_VISIBLE_DEVICES entries naming a GPU (or MIG slice) by UUID


def _visible_devices() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as CUDA reads it, or None when unset: its indices and UUIDs up to
    the first invalid entry (CUDA hides that one and every later one; "" hides all GPUs)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries: list[str] = []
    for entry in (e.strip() for e in value.split(",")):
        if not (re.fullmatch(r"[0-9]+", entry) or entry.startswith(_CUDA_UUID)):
            break
        entries.append(entry)
    return entries


def _query_nvidia_smi(select: str | None) -> list[tuple[str, str]] | None:
    """(name, compute capability) of the GPU `select` (an nvidia-smi -i index or UUID), or of
    every GPU in nvidia-smi's order (PCI bus order); None when nvidia-smi cannot be run."""
    command = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    if select is not None:
        command += ["-i", select]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip().splitlines()
        raise TensorRTMissingError(
            f"{' '.join(command)} failed ({said[0] if said else f'exit {result.returncode}'})"
        )
    return [parse_nvidia_smi(line) for line in result.stdout.splitlines() if line.strip()]


def _gpu_from_nvidia_smi(device: int) -> tuple[str, str] | None:
    """CUDA device `device` via nvidia-smi, for machines without cuda-python; None without it.

    nvidia-smi numbers GPUs in PCI bus order, CUDA fastest first unless
    CUDA_DEVICE_ORDER=PCI_BUS_ID, and relative to CUDA_VISIBLE_DEVICES (whose indices are in
    CUDA's order too). A UUID there, or the PCI order, names the GPU exactly; otherwise the
    answer is only certain when every GPU is the same model, and anything else is refused.
    """
    visible = _visible_devices()
    if visible is not None and device >= len(visible):
        raise TensorRTMissingError(
            f"no CUDA device {device}: CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r} makes {len(visible)} GPU(s) visible"
        )
    entry = visible[device] if visible is not None else str(device)
    pci_order = os.environ.get("CUDA_DEVICE_ORDER", "").strip().upper() == "PCI_BUS_ID"
    if entry.startswith(_CUDA_UUID) or pci_order:
        found = _query_nvidia_smi(entry)
        return found[0] if found else None
    every = _query_nvidia_smi(None)
    if not every:
        return None
    if visible is None and device >= len(every):
        raise TensorRTMissingError(f"no CUDA device {device}: nvidia-smi lists {len(every)} GPU(s)")
    if len(set(every)) == 1:
        return every[0]  # all GPUs alike: whichever CUDA means, this is it
    models = ", ".join(sorted({name for name, _ in every}))
    raise TensorRTMissingError(
        f"cannot tell which GPU CUDA device {device} is from nvidia-smi ({models}): it numbers "
        "GPUs in PCI bus order, CUDA fastest first; install cuda-python (pip install "
        "cuda-python) or set CUDA_DEVICE_ORDER=PCI_BUS_ID"
    )


def select_device(device: int) -> None:
    """Make CUDA `device` current on the calling thread: TensorRT builds (and deserializes) on
    the device current when its builder (runtime) is created. cuda-python's cudaSetDevice, else
    torch's; with neither, device 0 (CUDA's default) needs nothing and any other is refused.
    UserError for an index CUDA does not have."""
    if device < 0:
        raise UserError(f"--device: expected a CUDA device index 0, 1, ..., got {device}")
    cudart = import_cudart()
    if cudart is not None:
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess:
            reason = error_name(cudart, err)
            raise TensorRTMissingError(f"no usable CUDA GPU (cudaGetDeviceCount: {reason})")
        _check_index(device, count)
        err, *_ = cudart.cudaSetDevice(device)
        if err != cudart.cudaError_t.cudaSuccess:
            reason = error_name(cudart, err)
            raise TensorRTMissingError(f"cannot use CUDA device {device} (cudaSetDevice: {reason})")
        return
    torch = _import_torch_cuda()
    if torch is not None:
        _check_index(device, torch.cuda.device_count())
        torch.cuda.set_device(device)
        return
    if device != 0:
        raise UserError(
            f"--device {device}: choosing a GPU needs cuda-python (pip install cuda-python) or a "
            f"CUDA build of torch; or run with CUDA_VISIBLE_DEVICES={device} and --device 0"
        )


def _check_index(device: int, count: int) -> None:
    if device >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        among = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise UserError(
            f"--device {device}: no such CUDA device; this machine shows {count} GPU(s){among}, "
            f"numbered from 0"
        )


def _import_torch_cuda() -> Any:
    """torch when it is installed with a usable CUDA, else None (this module needs no torch)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def detect_platform(tensorrt_version: str, device: int = 0) -> Platform:
    """This machine's TensorRT version and the name and compute capability of CUDA `device`."""
    gpu = _gpu_from_cuda_python(device) or _gpu_from_nvidia_smi(device)
    if gpu is None:
        raise TensorRTMissingError(
            "cannot identify the CUDA GPU: neither cuda-python nor nvidia-smi is available; "
            f"{INSTALL_HINT}"
        )
    return Platform(tensorrt_version, *gpu)

"""Which backend, precision and device a Segmenter runs on, and opening that backend.

`choose` is the rule, a plain function of what this machine offers (tested everywhere);
`resolve` gathers those facts (TensorRT engines for this GPU, ONNX Runtime's CUDA provider,
torch's CUDA) and `open_backend` builds the chosen backend. "auto" prefers a TensorRT engine
built for this GPU, then ONNX Runtime on CUDA, then ONNX Runtime on CPU; precision "auto" is
fp16 on a GPU when the bundle (or engine) has it and fp32 on CPU, and always fp32 on the torch
backend (its reduced precisions are asked for: fp16 on CUDA, bf16 on CUDA and the CPU).

CUDA graphs (`cuda_graph`, see `graph_policy`): on by default for the torch backend on CUDA,
opt-in for ONNX Runtime's CUDA provider, never for TensorRT (its engines run as built); a
request that cannot be honoured here becomes a note.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapt_deploy.bundle.engine_files import list_engines
from adapt_deploy.bundle.meta import model_path, verify_hashes
from adapt_deploy.errors import UserError
from adapt_deploy.registry import BACKEND_CHOICES
from adapt_deploy.runtime import graph_policy
from adapt_deploy.runtime.backend import Backend

BACKENDS = BACKEND_CHOICES  # "auto" or a backend of adapt_deploy.registry.BACKENDS
PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # bf16: the torch backend only
ENGINE_PRECISIONS = ("fp16", "fp32")  # preference order on a GPU


@dataclass(frozen=True)
class Device:
    """Where to run: CUDA device `index` (None: CPU only); `required`: fail without that GPU."""

    index: int | None
    required: bool = False


def parse_device(device: int | str, name: str = "device") -> Device:
    """0, 1, ... (or "0", "1", ...): that GPU when a GPU backend is usable, else the CPU;
    "cuda" / "cuda:N": that GPU or an error; "cpu": the CPU even where a GPU is present.
    `name` is what a UserError calls the value (an option such as "--device")."""
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return Device(device)
    if isinstance(device, str):
        text = device.strip().lower()
        if text == "cpu":
            return Device(None)
        if text.isascii() and text.isdigit():
            return Device(int(text))
        match = re.fullmatch(r"cuda(?::(\d+))?", text)
        if match:
            return Device(int(match.group(1) or 0), required=True)
    raise UserError(
        f"{name}: expected a GPU index (0, 1, ...), 'cuda', 'cuda:N' or 'cpu'; got {device!r}"
    )


@dataclass(frozen=True)
class Choice:
    """The backend to open, its precision, its CUDA device (None: CPU), whether it replays CUDA
    graphs, and why other backends (or a request) were passed over."""

    backend: str
    precision: str
    cuda: int | None
    notes: tuple[str, ...] = field(default=())
    cuda_graph: bool = False


def choose(
    backend: str,
    precision: str,
    device: Device,
    bundle_precisions: list[str],
    engines: Mapping[str, Exception | None],
    ort_cuda: bool,
    torch_cuda: bool = False,
    cuda_graph: bool | None = None,
    graphs_env_off: bool = False,
) -> Choice:
    """The selection rule. `engines` maps an engine precision to None when a TensorRT engine
    for this machine exists, or to the error saying why not; `ort_cuda` / `torch_cuda` say
    whether ONNX Runtime / torch can use CUDA here; `cuda_graph` is the request (None: the
    backend's default) and `graphs_env_off` whether ADAPT_DEPLOY_CUDA_GRAPHS turns graphs off."""
    if backend not in BACKENDS:
        raise UserError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise UserError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    cuda_graph = graph_policy.check_request(cuda_graph)
    if precision == "bf16" and backend != "torch":
        raise UserError(
            "precision 'bf16' runs on the torch backend only (autocast); the ONNX models and "
            "TensorRT engines are fp32 or fp16: pass backend 'torch' or another precision"
        )
    gpu = device.index is not None
    notes: list[str] = []
    if backend in ("auto", "tensorrt") and gpu:
        wanted = list(ENGINE_PRECISIONS) if precision == "auto" else [precision]
        usable = [p for p in wanted if p in engines and engines[p] is None]
        if usable:
            if cuda_graph:
                notes.append("tensorrt: cuda_graph is not used; the engine runs as built")
            return Choice("tensorrt", usable[0], device.index, tuple(notes))
        reasons = [engines[p] for p in wanted if engines.get(p) is not None]
        if backend == "tensorrt":
            raise reasons[0] if reasons else UserError(f"no {wanted[0]} TensorRT engine")
        notes.extend(f"tensorrt: {r}" for r in reasons[:1])
    if backend == "tensorrt":
        raise UserError("backend 'tensorrt' needs a CUDA GPU, but device 'cpu' was given")
    if backend == "torch":
        cuda = device.index if gpu and torch_cuda else None
        if device.required and cuda is None:
            raise UserError(f"device cuda:{device.index}: torch sees no CUDA GPU here")
        if precision == "fp16" and cuda is None:
            raise UserError(
                "precision 'fp16': the torch backend runs fp16 on a CUDA GPU only (on the CPU: "
                "fp32 or bf16); for fp16 on the CPU use backend 'onnxruntime' (model_fp16.onnx)"
            )
        on_cuda = cuda is not None
        graphs, why = graph_policy.decide(cuda_graph, on_cuda, True, "torch", graphs_env_off)
        precision = "fp32" if precision == "auto" else precision
        return Choice("torch", precision, cuda, (*notes, *why), graphs)
    cuda = device.index if gpu and ort_cuda else None
    if device.required and cuda is None:
        raise UserError(
            f"device cuda:{device.index}: this onnxruntime has no CUDAExecutionProvider; "
            "install onnxruntime-gpu (and uninstall onnxruntime: they share one module)"
        )
    if gpu and cuda is None:
        notes.append("onnxruntime: no CUDAExecutionProvider, running on the CPU")
    if precision == "auto":
        precision = "fp16" if cuda is not None and "fp16" in bundle_precisions else "fp32"
    graphs, why = graph_policy.decide(
        cuda_graph, cuda is not None, False, "onnxruntime", graphs_env_off
    )
    return Choice("onnxruntime", precision, cuda, (*notes, *why), graphs)


# --------------------------------------------------------------------------------------------
# Facts about this machine
# --------------------------------------------------------------------------------------------


def probe_engines(bundle: Path, device: int, explicit: bool) -> dict[str, Exception | None]:
    """{precision: None if this machine has a usable engine, else why not}. Without any plan
    file in the bundle TensorRT is not even imported (unless asked for explicitly)."""
    from adapt_deploy.bundle.engine_files import EngineError, select_engine

    if not explicit and not list_engines(bundle):
        return {p: EngineError(f"no TensorRT engine in {bundle}") for p in ENGINE_PRECISIONS}
    from adapt_deploy.bundle.platform import detect_platform, import_tensorrt

    try:
        here = detect_platform(import_tensorrt().__version__, device)
    except UserError as exc:
        return dict.fromkeys(ENGINE_PRECISIONS, exc)
    found: dict[str, Exception | None] = {}
    for precision in ENGINE_PRECISIONS:
        try:
            select_engine(bundle, precision, here)
            found[precision] = None
        except UserError as exc:
            found[precision] = exc
    return found


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve(
    bundle: Path,
    meta: dict[str, Any],
    backend: str,
    precision: str,
    device: Device,
    cuda_graph: bool | None = None,
) -> Choice:
    """Gather what this machine offers for this request and apply `choose`."""
    from adapt_deploy.runtime.onnxruntime_backend import cuda_available

    gpu = device.index is not None
    engines: dict[str, Exception | None] = {}
    if gpu and backend in ("auto", "tensorrt"):
        engines = probe_engines(bundle, device.index or 0, explicit=backend == "tensorrt")
    ort_cuda = gpu and backend in ("auto", "onnxruntime") and cuda_available()
    torch_cuda = gpu and backend == "torch" and torch_cuda_available()
    return choose(
        backend,
        precision,
        device,
        meta["precision"],
        engines,
        ort_cuda,
        torch_cuda,
        cuda_graph,
        graph_policy.graphs_env_off(),
    )


def open_backend(
    bundle: Path,
    meta: dict[str, Any],
    choice: Choice,
    threads: int | None = None,
    check_hashes: bool = True,
) -> Backend:
    """Load the chosen backend (model hashes checked first, as verify does)."""
    if choice.backend == "tensorrt":
        from adapt_deploy.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(bundle, meta, choice.precision, device=choice.cuda or 0)
    if choice.backend == "torch":
        from adapt_deploy.runtime.torch_backend import TorchBackend

        device = "cpu" if choice.cuda is None else f"cuda:{choice.cuda}"
        return TorchBackend(bundle, meta, device, choice.precision, choice.cuda_graph)
    from adapt_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

    path = model_path(bundle, meta, choice.precision)  # BundleError when the bundle lacks it
    if check_hashes:
        verify_hashes(bundle, meta, choice.precision)
    return OnnxRuntimeBackend(
        path,
        meta["input"]["layout"],
        meta["num_classes"],
        choice.precision,
        cuda_device=choice.cuda,
        threads=threads,
        cuda_graph=choice.cuda_graph,
    )

"""ONNX Runtime backend: CPU or CUDA execution provider, with IO binding to fixed buffers.

Outputs are bound to preallocated host arrays and, on CPU, the input too, so a call allocates
nothing. On CUDA the input lives in a device OrtValue updated in place from the host buffer,
outputs other than labels and presence (logits) stay on the device, and ONNX Runtime copies
labels and presence back into the host arrays. onnxruntime is imported when a session is made,
not with this module. The CUDA path is written against onnxruntime-gpu's documented IO binding
API and has not run here (no GPU).

`cuda_graph=True` (CUDA only, onnxruntime >= 1.18) turns on the CUDA provider's
`enable_cuda_graph`: every input and output is then bound to device memory that never moves
(labels and presence are copied to the host arrays after each run), and each batch shape gets
its own `gpu_graph_id` (a RunOptions entry), which ONNX Runtime captures on that id's first run
and replays after. The first run of a shape is also run without a graph (`gpu_graph_id` -1) and
the replay compared with it (`graph_policy.replay_mismatch`); a shape whose graph fails or
differs runs without one, with a note in `notes`. A session that cannot be made with graphs
(a node the CUDA provider does not run, say) is made without, with a note. At most
MAX_GRAPHS shapes get a graph (ONNX Runtime keeps every captured graph for the session's life);
later shapes run without one. NOT RUN: no GPU here; only the option plumbing and its refusal
on the CPU are tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapt_deploy.errors import UserError
from adapt_deploy.runtime.backend import Shape, ShapeCache, graph_shape, input_dtype
from adapt_deploy.runtime.graph_policy import replay_mismatch

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
GPU_HINT = "install onnxruntime-gpu (and uninstall onnxruntime: they share one module)"
GRAPH_MIN_VERSION = (1, 18)  # several graphs per session (gpu_graph_id); older ones replay one
MAX_GRAPHS = 8
NO_GRAPH = -1  # gpu_graph_id of a run without capture or replay


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


def cuda_provider_options(device: int, cuda_graph: bool = False) -> dict[str, Any]:
    """The CUDA execution provider's options: the device, and CUDA graphs when asked."""
    options: dict[str, Any] = {"device_id": device}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return options


def graph_support(version: str) -> str | None:
    """None when this onnxruntime version keeps a CUDA graph per gpu_graph_id, else why not."""
    try:
        major, minor = (int(v) for v in version.split(".")[:2])
    except ValueError:
        return f"onnxruntime {version!r}: cannot tell whether it supports gpu_graph_id"
    if (major, minor) < GRAPH_MIN_VERSION:
        need = ".".join(map(str, GRAPH_MIN_VERSION))
        return f"onnxruntime {version} keeps one CUDA graph per session; {need} or newer needed"
    return None


def create_session(
    path: Path | bytes,
    cuda_device: int | None = None,
    threads: int | None = None,
    cuda_graph: bool = False,
) -> Any:
    """An InferenceSession on CPU, or on CUDA device `cuda_device` with CPU fallback for ops
    the CUDA provider lacks. `threads` caps intra-op CPU threads (default: all cores). `path`
    may also be a serialized model (on-device adaptation pushes updated weights that way).
    `cuda_graph`: the CUDA provider captures CUDA graphs (see the module docstring)."""
    import onnxruntime as ort

    if cuda_graph and cuda_device is None:
        raise UserError(
            "cuda_graph: ONNX Runtime's CUDA graphs need the CUDA provider (a cuda_device); "
            "the CPU provider has none"
        )
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: fp16 graphs on CPU log cast insertions
    providers: list[Any] = [CPU_PROVIDER]
    if cuda_device is not None:
        require_cuda(f"device cuda:{cuda_device}")
        providers.insert(0, (CUDA_PROVIDER, cuda_provider_options(cuda_device, cuda_graph)))
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
    # CUDA graphs: every output's OrtValue on the device, in binding order (extra outputs get
    # theirs after the first run tells their shape); the RunOptions naming the graph
    device_outputs: dict[str, Any] | None = None
    run_options: Any = None
    checked: bool = False  # the graph's first replay was compared with a run without it


class OnnxRuntimeBackend:
    """A bundle's ONNX model in one ONNX Runtime session (see the module docstring). Without
    `layout` and `num_classes` they are read from the graph (a uint8 NHWC or float NCHW input,
    and the `presence` output's class count): enough for a model file on its own."""

    name = "onnxruntime"

    def __init__(
        self,
        model: Path | bytes,
        layout: str | None = None,
        num_classes: int | None = None,
        precision: str = "fp32",
        cuda_device: int | None = None,
        threads: int | None = None,
        cuda_graph: bool = False,
    ) -> None:
        if cuda_graph and cuda_device is None:
            raise UserError(
                "cuda_graph: ONNX Runtime's CUDA graphs need the CUDA provider (a cuda_device); "
                "the CPU provider has none"
            )
        self.notes: list[str] = []
        self.cuda_graph = cuda_graph and self._graphs_supported()
        self.session = self._open(model, cuda_device, threads)
        if cuda_device is not None and CUDA_PROVIDER not in self.session.get_providers():
            where = "the serialized model" if isinstance(model, bytes) else model
            raise UserError(
                f"{where}: ONNX Runtime could not start its CUDA provider on device "
                f"{cuda_device} (its log says why: usually missing CUDA or cuDNN libraries)"
            )
        self.precision = precision
        self.device = "cpu" if cuda_device is None else f"cuda:{cuda_device}"
        self.threads = threads  # intra-op CPU threads (None: all cores); replacements reuse it
        self._cuda = cuda_device
        graph_input = self.session.get_inputs()[0]
        self._input = graph_input.name
        self._layout = layout or ("NHWC" if graph_input.shape[-1] == 3 else "NCHW")
        self._num_classes = num_classes or self._graph_classes()
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._extra = [n for n in self._outputs if n not in ("labels", "presence")]
        self._graph_ids = 0  # gpu_graph_id given out so far (ids start at 1: 0 is ORT's own)
        self._bindings: ShapeCache[_Binding] = ShapeCache(self._bind)

    def _graph_classes(self) -> int:
        """The class count the graph's `presence` output declares (batch, classes)."""
        for output in self.session.get_outputs():
            if output.name == "presence" and isinstance(output.shape[-1], int):
                return output.shape[-1]
        raise UserError("the ONNX graph declares no static class count on its presence output")

    def _graphs_supported(self) -> bool:
        import onnxruntime as ort

        why = graph_support(ort.__version__)
        if why is not None:
            self.notes.append(f"onnxruntime: CUDA graphs off: {why}")
        return why is None

    def _open(self, model: Path | bytes, cuda_device: int | None, threads: int | None) -> Any:
        """The session, with CUDA graphs when asked and ONNX Runtime accepts them."""
        if not self.cuda_graph:
            return create_session(model, cuda_device, threads)
        try:
            return create_session(model, cuda_device, threads, cuda_graph=True)
        except UserError:
            raise
        except Exception as exc:  # e.g. nodes outside the CUDA provider: graphs impossible
            self.cuda_graph = False
            self.notes.append(
                f"onnxruntime: CUDA graphs off, the session refused them "
                f"({type(exc).__name__}: {exc})"
            )
            return create_session(model, cuda_device, threads)

    def _bind(self, shape: Shape) -> _Binding:
        host = np.empty(graph_shape(shape, self._layout), input_dtype(self._layout))
        labels = np.empty(shape, np.int32)
        presence = np.empty((shape[0], self._num_classes), np.float32)
        io = self.session.io_binding()
        if self._cuda is None:
            io.bind_input(self._input, "cpu", 0, host.dtype, list(host.shape), host.ctypes.data)
            for name, array in (("labels", labels), ("presence", presence)):
                io.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            for name in self._extra:  # e.g. logits
                io.bind_output(name, "cpu", 0)
            return _Binding(io, host, None, labels, presence)
        import onnxruntime as ort

        device_input = ort.OrtValue.ortvalue_from_shape_and_type(
            list(host.shape), host.dtype, "cuda", self._cuda
        )
        io.bind_ortvalue_input(self._input, device_input)
        binding = _Binding(io, host, device_input, labels, presence)
        if self.cuda_graph and self._graph_ids < MAX_GRAPHS:
            self._graph_ids += 1
            binding.run_options = _run_options(self._graph_ids)
            binding.device_outputs = {}
            for name, array in (("labels", labels), ("presence", presence)):
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    list(array.shape), array.dtype, "cuda", self._cuda
                )
                io.bind_ortvalue_output(name, value)
                binding.device_outputs[name] = value
        else:
            if self.cuda_graph:  # never the session's default id 0: it would replay one shape
                binding.run_options = _run_options(NO_GRAPH)
            if self.cuda_graph and not any("shapes have CUDA graphs" in n for n in self.notes):
                self.notes.append(
                    f"onnxruntime: {MAX_GRAPHS} shapes have CUDA graphs; batch shape "
                    f"{list(shape)} and later new shapes run without one"
                )
            for name, array in (("labels", labels), ("presence", presence)):
                io.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name in self._extra:  # e.g. logits: left where they are computed
            io.bind_output(name, "cuda", self._cuda)
        return binding

    def input_buffer(self, shape: Shape) -> np.ndarray:
        return self._bindings.get(shape).host_input

    def run(self, shape: Shape) -> tuple[np.ndarray, np.ndarray]:
        binding = self._bindings.get(shape)
        if binding.device_input is not None:
            binding.device_input.update_inplace(binding.host_input)
        if binding.device_outputs is None:
            self.session.run_with_iobinding(binding.io, binding.run_options)
            binding.io.synchronize_outputs()
        elif not binding.checked:
            self._first_graph_run(binding, shape)
        else:
            self.session.run_with_iobinding(binding.io, binding.run_options)
            self._copy_out(binding)
        return binding.labels, binding.presence

    def _first_graph_run(self, binding: _Binding, shape: Shape) -> None:
        """Run without a graph (the reference; it also tells the extra outputs' shapes, which
        then get fixed device buffers), then capture and replay, and compare."""
        import onnxruntime as ort

        outputs = binding.device_outputs
        assert outputs is not None
        self.session.run_with_iobinding(binding.io, _run_options(NO_GRAPH))
        bound = ["labels", "presence", *self._extra]  # get_outputs() follows the binding order
        expected = [value.numpy() for value in binding.io.get_outputs()]
        for name, array in zip(bound, expected, strict=True):
            if name not in self._extra:
                continue
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                list(array.shape), array.dtype, "cuda", self._cuda
            )
            binding.io.bind_ortvalue_output(name, value)
            outputs[name] = value
        binding.checked = True
        try:
            for _ in range(2):  # the first run with an id captures, the second replays
                self.session.run_with_iobinding(binding.io, binding.run_options)
            got = [outputs[name].numpy() for name in bound]
            problem = replay_mismatch(expected, got)
        except Exception as exc:  # capture refused: the run without a graph stands
            problem = f"capture failed ({type(exc).__name__}: {exc})"
        if problem is None:
            self._copy_out(binding)
            return
        self.notes.append(
            f"onnxruntime: CUDA graph of batch shape {list(shape)} off, running without: {problem}"
        )
        binding.run_options = _run_options(NO_GRAPH)
        np.copyto(binding.labels, expected[0])
        np.copyto(binding.presence, expected[1])

    @staticmethod
    def _copy_out(binding: _Binding) -> None:
        """Labels and presence from their device buffers into the host arrays."""
        outputs = binding.device_outputs
        assert outputs is not None
        np.copyto(binding.labels, outputs["labels"].numpy())
        np.copyto(binding.presence, outputs["presence"].numpy())

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every graph output by name (logits too, when the graph has them) for one input batch
        in the graph's layout, as fresh arrays: what verify, export's parity check and bundle
        evaluation compare. Not under CUDA graphs (they need the bound buffers of `run`)."""
        if self.session is None:
            raise UserError("this ONNX Runtime backend is closed")
        if self.cuda_graph:
            raise UserError("outputs(): not available with CUDA graphs on; use run()")
        values = self.session.run(None, {self._input: batch})
        return dict(zip(self._outputs, values, strict=True))

    def close(self) -> None:
        self._bindings.clear()
        self.session = None


def _run_options(graph_id: int) -> Any:
    """RunOptions that run under CUDA graph `graph_id` (NO_GRAPH: capture nothing)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options

"""Fault-probe regressions for the TensorRT code paths (issue 13, items 16-21)

TensorRT and cuda-python cannot be installed here (no GPU): each test drives the real code with
a small stand-in for exactly the part of their API that the code touches (an engine and
execution context, a network of layers and tensors, a Refitter, a cudart module and stream),
or, for nvidia-smi, a real executable script placed first on PATH.
"""

from __future__ import annotations

import enum
import os
import sys
import types
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers import open_fake_tensorrt_backend

from adapt_deploy.bundle import platform as trt_platform
from adapt_deploy.bundle.engine_files import EngineError, EngineRecord, Platform
from adapt_deploy.bundle.meta import BundleError, load_meta
from adapt_deploy.bundle.platform import TensorRTMissingError, detect_platform
from adapt_deploy.errors import UserError
from adapt_deploy.export.trt_plan import build_mode, prepare_build
from bench.tensorrt_check import write_tiny_bundle

H100 = Platform("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")


# --------------------------------------------------------------------------------------------
# Item 16: a -1 (data-dependent) output dim is never allocated from
# --------------------------------------------------------------------------------------------


class RecordingMemory:
    """The CudaMemory interface, recording the size of every device allocation."""

    def __init__(self, device: int) -> None:
        self.device_bytes: list[int] = []
        self.closed = False
        self.stream = 1

    def activate(self) -> None:
        pass

    def device(self, nbytes: int) -> int:
        self.device_bytes.append(nbytes)
        return 4096 * len(self.device_bytes)

    def host(self, nbytes: int) -> np.ndarray:
        return np.zeros(max(nbytes, 1), np.uint8)

    def close(self) -> None:
        self.closed = True


class ShapedEngine:
    """ICudaEngine + IExecutionContext: `tensors` {name: shape at the max input shape};
    get_max_output_size answers `bound` (TensorRT 10's upper bound in bytes, -1 if unknown)."""

    def __init__(self, tensors: dict[str, tuple[int, ...]], bound: int = -1) -> None:
        self.tensors, self.bound = tensors, bound
        self.num_io_tensors = len(tensors)

    def create_execution_context(self) -> ShapedEngine:
        return self

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        return True

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_dtype(self, name: str) -> Any:
        return np.int32 if name == "labels" else np.float32

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name]

    def get_max_output_size(self, name: str) -> int:
        return self.bound

    def set_tensor_address(self, name: str, address: int) -> bool:
        return True


def open_trt_backend(monkeypatch, engine: ShapedEngine, memories: list[RecordingMemory]) -> Any:
    """TensorRTBackend's set-up on `engine` with stand-ins for tensorrt, the GPU and memory
    (each memory it opens is appended to `memories`)."""

    def memory(device: int) -> RecordingMemory:
        memories.append(RecordingMemory(device))
        return memories[-1]

    return open_fake_tensorrt_backend(monkeypatch, engine, memory, "image", [2, 128, 192, 3])


IO = {"image": (2, 128, 192, 3), "labels": (2, 128, 192), "presence": (2, 4)}


@pytest.mark.parametrize(
    ("name", "shape"), [("labels", (2, -1, 192)), ("presence", (-1, 4))], ids=["labels", "presence"]
)
def test_item16_a_data_dependent_dim_of_a_read_back_output_is_refused(monkeypatch, name, shape):
    """Even with an upper bound: the backend reads these back by shape after each run."""
    memories: list[RecordingMemory] = []
    engine = ShapedEngine({**IO, name: shape}, bound=1 << 20)
    message = rf"x\.plan: tensor '{name}' has shape \[{', '.join(map(str, shape))}\]"
    with pytest.raises(EngineError, match=message + ".*data-dependent"):
        open_trt_backend(monkeypatch, engine, memories)
    (memory,) = memories
    assert all(n > 0 for n in memory.device_bytes)  # never sized from a negative product
    assert memory.closed  # what was allocated before the refusal went back


def test_item16_an_unread_data_dependent_output_is_sized_by_get_max_output_size(monkeypatch):
    """IExecutionContext.get_max_output_size: TensorRT's own upper bound, in bytes."""
    memories: list[RecordingMemory] = []
    engine = ShapedEngine({**IO, "debug_mask": (-1, 4)}, bound=8192)
    backend = open_trt_backend(monkeypatch, engine, memories)
    sizes = [2 * 128 * 192 * 3 * 4, 2 * 128 * 192 * 4, 2 * 4 * 4, 8192]
    assert memories[0].device_bytes == sizes
    backend.close()


def test_item16_an_unread_data_dependent_output_without_a_bound_is_refused(monkeypatch):
    memories: list[RecordingMemory] = []
    engine = ShapedEngine({**IO, "debug_mask": (-1, 4)}, bound=-1)
    with pytest.raises(EngineError, match=r"tensor 'debug_mask' has shape \[-1, 4\]"):
        open_trt_backend(monkeypatch, engine, memories)
    assert memories[0].closed


# --------------------------------------------------------------------------------------------
# Item 17: the nvidia-smi fallback identifies CUDA's device `device`, or refuses
# --------------------------------------------------------------------------------------------

A100 = ("GPU-aaaa1111", "NVIDIA A100-SXM4-40GB", "8.0")
H100_GPU = ("GPU-bbbb2222", "NVIDIA H100 80GB HBM3", "9.0")

FAKE_NVIDIA_SMI = """#!{python}
import sys
GPUS = {gpus!r}  # (uuid, name, compute capability) in PCI bus order, as nvidia-smi lists them
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
rows = GPUS
if "-i" in args:
    wanted = args[args.index("-i") + 1]
    rows = [g for i, g in enumerate(GPUS) if wanted in (str(i), g[0])]
    if not rows:
        print("No devices were found", file=sys.stderr)
        sys.exit(6)
for uuid, name, cap in rows:
    print(f"{{name}}, {{cap}}")
"""


@pytest.fixture
def nvidia_smi(tmp_path, monkeypatch):
    """Install a fake nvidia-smi listing the given GPUs first on PATH; returns its call log."""

    def install(*gpus: tuple[str, str, str]) -> Path:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        log = tmp_path / "nvidia-smi.log"
        script = bin_dir / "nvidia-smi"
        script.write_text(
            FAKE_NVIDIA_SMI.format(python=sys.executable, gpus=list(gpus), log=str(log))
        )
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        monkeypatch.setattr(trt_platform, "import_cudart", lambda: None)  # no cuda-python here
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
        return log

    return install


def test_item17_pci_bus_order_queries_the_requested_device(nvidia_smi, monkeypatch):
    log = nvidia_smi(A100, H100_GPU)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    here = detect_platform("10.8.0.43", device=1)
    assert (here.gpu_name, here.compute_capability) == ("NVIDIA H100 80GB HBM3", "9.0")
    assert log.read_text().split()[-2:] == ["-i", "1"]
    assert detect_platform("10.8.0.43", device=0).gpu_name == "NVIDIA A100-SXM4-40GB"


def test_item17_fastest_first_order_with_different_gpus_is_refused(nvidia_smi):
    """CUDA's default order (FASTEST_FIRST) is not nvidia-smi's: the index names no GPU."""
    nvidia_smi(A100, H100_GPU)
    for device in (0, 1):
        with pytest.raises(TensorRTMissingError) as info:
            detect_platform("10.8.0.43", device=device)
        message = str(info.value)
        assert f"CUDA device {device}" in message
        assert "pip install cuda-python" in message
        assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in message


def test_item17_fastest_first_order_with_identical_gpus_is_certain(nvidia_smi):
    log = nvidia_smi(H100_GPU, ("GPU-cccc3333", *H100_GPU[1:]))
    assert detect_platform("10.8.0.43", device=1).gpu_name == "NVIDIA H100 80GB HBM3"
    assert "-i" not in log.read_text()  # every GPU was queried
    with pytest.raises(TensorRTMissingError, match="no CUDA device 2: nvidia-smi lists 2 GPU"):
        detect_platform("10.8.0.43", device=2)


def test_item17_visible_device_uuids_pick_the_device_th_entry(nvidia_smi, monkeypatch):
    log = nvidia_smi(A100, H100_GPU)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{H100_GPU[0]},{A100[0]}")
    assert detect_platform("10.8.0.43", device=0).gpu_name == "NVIDIA H100 80GB HBM3"
    assert detect_platform("10.8.0.43", device=1).gpu_name == "NVIDIA A100-SXM4-40GB"
    assert log.read_text().split()[-2:] == ["-i", A100[0]]


def test_item17_visible_device_indices_follow_the_pci_order_when_set(nvidia_smi, monkeypatch):
    nvidia_smi(A100, H100_GPU)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert detect_platform("10.8.0.43", device=0).gpu_name == "NVIDIA H100 80GB HBM3"
    assert detect_platform("10.8.0.43", device=1).gpu_name == "NVIDIA A100-SXM4-40GB"
    monkeypatch.delenv("CUDA_DEVICE_ORDER")  # the same indices in CUDA's own order: unknown
    with pytest.raises(TensorRTMissingError, match="CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        detect_platform("10.8.0.43", device=0)


def test_item17_a_device_beyond_cuda_visible_devices_is_refused(nvidia_smi, monkeypatch):
    nvidia_smi(A100, H100_GPU)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")  # CUDA stops at the invalid entry
    with pytest.raises(TensorRTMissingError, match="no CUDA device 1: CUDA_VISIBLE_DEVICES="):
        detect_platform("10.8.0.43", device=1)
    assert detect_platform("10.8.0.43", device=0).gpu_name == "NVIDIA A100-SXM4-40GB"


# --------------------------------------------------------------------------------------------
# Item 18: _pin_fp32 pins float layers only
# --------------------------------------------------------------------------------------------


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    INT64 = 8


LayerType = enum.Enum("LayerType", "CONVOLUTION REDUCE TOPK UNARY SOFTMAX CAST")
UnaryOperation = enum.Enum("UnaryOperation", "EXP LOG ABS")


class Tensor:
    """ITensor: a name and a dtype."""

    def __init__(self, name: str, dtype: DataType) -> None:
        self.name, self.dtype = name, dtype


class Layer:
    """ILayer: type, inputs, outputs; records precision and set_output_type."""

    def __init__(self, name, type_, inputs, outputs, op=None) -> None:
        self.name, self.type, self.op = name, type_, op
        self._inputs, self._outputs = inputs, outputs
        self.precision: DataType | None = None
        self.output_types: dict[int, DataType] = {}

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_input(self, j: int) -> Tensor | None:
        return self._inputs[j]

    def get_output(self, j: int) -> Tensor:
        return self._outputs[j]

    def set_output_type(self, j: int, dtype: DataType) -> None:
        self.output_types[j] = dtype


class UnaryLayer(Layer):
    """IUnaryLayer: what `layer.__class__ = trt.IUnaryLayer` turns a UNARY layer into."""


class Network:
    """INetworkDefinition: layers and marked outputs."""

    def __init__(self, layers: list[Layer], outputs: list[Tensor]) -> None:
        self._layers, self._outputs = layers, outputs
        self.num_layers, self.num_outputs = len(layers), len(outputs)

    def get_layer(self, i: int) -> Layer:
        return self._layers[i]

    def get_output(self, i: int) -> Tensor:
        return self._outputs[i]


FAKE_TRT = SimpleNamespace(
    LayerType=LayerType,
    IUnaryLayer=UnaryLayer,
    float32=DataType.FLOAT,
    float16=DataType.HALF,
    int32=DataType.INT32,
    int64=DataType.INT64,
)


def segmenter_network() -> tuple[Network, dict[str, Layer]]:
    """The tail of a segmenter as TensorRT's ONNX parser builds it, plus integer layers."""
    f16, i32, i64 = DataType.HALF, DataType.INT32, DataType.INT64
    t = {
        name: Tensor(name, dtype)
        for name, dtype in {
            "x": f16, "logits": f16, "lse": f16, "presence": f16, "up": f16,
            "argmax_values": f16, "argmax_indices": i32, "labels": i32,
            "shape": i64, "numel": i64, "ids": i32, "top_ids": i32, "top_ids_idx": i32,
            "top_vals": f16, "top_idx": i32, "exp": f16, "abs": f16,
        }.items()
    }  # fmt: skip
    layers = [
        Layer("conv", LayerType.CONVOLUTION, [t["x"]], [t["logits"]]),
        Layer("lse", LayerType.REDUCE, [t["logits"]], [t["lse"]]),  # float: pinned
        Layer("sigmoid_exp", LayerType.UNARY, [t["lse"]], [t["exp"]], UnaryOperation.EXP),
        Layer("abs", LayerType.UNARY, [t["exp"]], [t["abs"]], UnaryOperation.ABS),
        # ArgMax: a TopK (k=1) whose float values nobody reads, only its int32 indices
        Layer("argmax", LayerType.TOPK, [t["up"]], [t["argmax_values"], t["argmax_indices"]]),
        Layer("labels", LayerType.CAST, [t["argmax_indices"]], [t["labels"]]),
        Layer("numel", LayerType.REDUCE, [t["shape"]], [t["numel"]]),  # a shape computation
        Layer("int_topk", LayerType.TOPK, [t["ids"]], [t["top_ids"], t["top_ids_idx"]]),
        Layer("float_topk", LayerType.TOPK, [t["up"]], [t["top_vals"], t["top_idx"]]),
    ]
    outputs = [t[n] for n in ("labels", "presence", "abs", "numel", "top_ids", "top_vals")]
    return Network(layers, outputs), {layer.name: layer for layer in layers}


def test_item18_only_float_reductions_topk_and_exp_are_pinned():
    from adapt_deploy.export.tensorrt import _pin_fp32

    network, layers = segmenter_network()
    count = _pin_fp32(FAKE_TRT, network)
    pinned = {name for name, layer in layers.items() if layer.precision is not None}
    assert pinned == {"lse", "sigmoid_exp", "float_topk"}
    assert count == 3
    for name in pinned:
        assert layers[name].precision is DataType.FLOAT
    assert layers["float_topk"].output_types == {0: DataType.FLOAT}  # indices stay int32
    assert layers["lse"].output_types == {0: DataType.FLOAT}
    for name in ("argmax", "numel", "int_topk"):  # integer work is left alone
        assert layers[name].output_types == {}


# --------------------------------------------------------------------------------------------
# Item 19: TensorRT 10.12 and later are strongly typed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["10.12.0.36", "10.13.3", "10.14.1.48"])
def test_item19_tensorrt_10_12_builds_strongly_typed_from_model_fp16(version):
    mode = build_mode(version, "fp16")
    assert (mode.model, mode.strongly_typed, mode.fp16_flag, mode.pin_fp32) == (
        "fp16",
        True,
        False,
        False,
    )
    assert mode.fp16_source == "strongly typed model_fp16.onnx"
    fp32 = build_mode(version, "fp32")
    assert (fp32.model, fp32.strongly_typed, fp32.fp16_flag) == ("fp32", True, False)
    weak = build_mode("10.11.0.33", "fp16")  # the last release before the deprecation
    assert (weak.model, weak.fp16_flag, weak.pin_fp32) == ("fp32", True, True)


def test_item19_tensorrt_10_12_networks_are_created_with_the_strongly_typed_flag():
    from adapt_deploy.export.tensorrt import _create_network

    calls: list[tuple[int, ...]] = []
    builder = SimpleNamespace(create_network=lambda *flags: calls.append(flags))
    flag = SimpleNamespace(STRONGLY_TYPED=1)
    for version, expected in (("10.12.0", (1 << 1,)), ("11.0.0", ())):
        trt = SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=flag)
        _create_network(trt, builder, strongly_typed=build_mode(version, "fp16").strongly_typed)
        assert calls.pop() == expected


def test_item19_messages_state_the_10_12_rule(tmp_path):
    with pytest.raises(EngineError, match=r"TensorRT 10 or later"):
        build_mode("9.3.0", "fp16")
    bundle = write_tiny_bundle(tmp_path / "fp32only", fp16=False)
    with pytest.raises(BundleError, match=r"TensorRT 10\.12 and later build strongly typed"):
        prepare_build(bundle, load_meta(bundle), "fp16", "10.12.0", refit=False)


# --------------------------------------------------------------------------------------------
# Item 20: engines built with REFIT (not REFIT_INDIVIDUAL) are refused for --adapt at set-up
# --------------------------------------------------------------------------------------------


def engine_record(refit_mode: str, precision: str = "fp32", onnx_file: str = "model.onnx"):
    return EngineRecord(
        engine=f"model.trt10.8.0_NVIDIA-H100_sm90.{refit_mode}.plan",
        engine_sha256="0" * 64,
        tensorrt_version="10.8.0.43",
        gpu_name="NVIDIA H100",
        compute_capability="9.0",
        precision=precision,
        fp16_source="none",
        onnx_model="fp32",
        onnx_file=onnx_file,
        onnx_sha256="0" * 64,
        input_name="image",
        profile={"min": [1, 16, 16, 3], "opt": [1, 64, 96, 3], "max": [4, 256, 512, 3]},
        refittable=refit_mode != "none",
        refit_mode=refit_mode,
        refittable_weights=[],
        layers={},
        build_seconds=1.0,
        built_at="2026-01-01T00:00:00+00:00",
        adapt_deploy_version="0",
    )


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_item20_a_refit_all_engine_is_refused_with_the_rebuild_command(tmp_path, precision):
    from adapt_deploy.tta.sync_tensorrt import check_refittable

    record = engine_record("all", precision)
    with pytest.raises(UserError) as info:
        check_refittable(record, tmp_path)
    message = str(info.value)
    assert str(tmp_path / "engines" / record.engine) in message
    fp16 = " --fp16" if precision == "fp16" else ""
    assert f"`adapt-deploy build-engine {tmp_path}{fp16} --refit`" in message
    assert "REFIT_INDIVIDUAL" in message
    check_refittable(engine_record("individual", precision), tmp_path)  # the kind it pushes into


def test_item20_a_refit_all_engine_of_a_bundle_with_batchnorm_nodes_says_to_re_export(tmp_path):
    """Rebuilding alone would give REFIT again: the ONNX must be BN-folded first."""
    from adapt_deploy.tta.sync_tensorrt import check_refittable

    bundle = write_tiny_bundle(tmp_path / "bn", fold_bn=False)
    with pytest.raises(UserError, match=r"keeps BatchNormalization nodes.*re-export the bundle"):
        check_refittable(engine_record("all"), bundle)


def test_item20_the_tensorrt_sync_refuses_a_refit_all_engine_before_loading_it(
    tiny_bundle, monkeypatch
):
    """The issue's engine: its Refitter lists the ONNX names among the parser's and then asks
    for generated names (fused weights) the ONNX lacks, so every push would fail."""
    import onnx

    from adapt_deploy.bundle.meta import model_path
    from adapt_deploy.models.checkpoints import load_checkpoint
    from adapt_deploy.tta import sync_tensorrt
    from adapt_deploy.tta.push import graph_spec

    model, config = load_checkpoint(tiny_bundle.parent / "tiny.pt")
    meta = load_meta(tiny_bundle)
    proto = onnx.load(str(model_path(tiny_bundle, meta, "fp32")), load_external_data=False)
    inits = [t.name for t in proto.graph.initializer]
    opened: list[object] = []

    class Standby:
        engine = object()

        def __init__(self, *args: object, **kwargs: object) -> None:
            opened.append(self)

        def close(self) -> None:
            pass

    class Refitter:
        def __init__(self, engine: object, logger: object) -> None:
            pass

        def get_all_weights(self) -> list[str]:
            return [*inits, "onnx_tensorrt_scale_1", "onnx_tensorrt_shift_1"]

        def get_missing_weights(self) -> list[str]:
            return ["onnx_tensorrt_scale_1"]

    trt = SimpleNamespace(__version__="10.8.0.43", Logger=lambda level: None, Refitter=Refitter)
    trt.Logger.WARNING = 2  # type: ignore[attr-defined]
    record = engine_record("all", onnx_file="model.onnx")
    monkeypatch.setattr(sync_tensorrt, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(sync_tensorrt, "detect_platform", lambda version, device: None)
    monkeypatch.setattr(sync_tensorrt, "read_engine", lambda *args: (b"", record))
    monkeypatch.setattr(sync_tensorrt, "TensorRTBackend", Standby)
    seg = SimpleNamespace(bundle=tiny_bundle, meta=meta, precision="fp32", device="cuda:0")
    with pytest.raises(UserError, match=r"REFIT_INDIVIDUAL"):
        sync_tensorrt.TensorRTSync(seg, model, config.input, graph_spec(meta))
    assert not opened  # refused before a standby engine took GPU memory


# --------------------------------------------------------------------------------------------
# Item 21: cuda-python handles through get_cuda_native_handle, not int()
# --------------------------------------------------------------------------------------------


class Stream:
    """A cuda-python cudaStream_t: int() on it is deprecated (cuda-python "Tips and Tricks")."""

    def __init__(self, address: int) -> None:
        self.address = address

    def __int__(self) -> int:
        warnings.warn("int(cuda_obj) is deprecated", DeprecationWarning, stacklevel=2)
        return self.address


def fake_cudart(stream: Stream, created: list[tuple[int, int]] | None = None) -> SimpleNamespace:
    """A stand-in cuda-python runtime module; `created` gets the (flags, priority) of each
    stream made."""

    def create_with_priority(flags: int, priority: int) -> tuple[int, Stream]:
        if created is not None:
            created.append((flags, priority))
        return 0, stream

    return SimpleNamespace(
        cudaError_t=SimpleNamespace(cudaSuccess=0),
        cudaStreamNonBlocking=1,
        cudaSetDevice=lambda device: (0,),
        cudaStreamCreateWithPriority=create_with_priority,
        cudaStreamSynchronize=lambda s: (0,),
        cudaStreamDestroy=lambda s: (0,),
    )


@pytest.mark.parametrize(("setting", "priority"), [(None, -1), ("own", -1), ("shared", 0)])
def test_the_tensorrt_stream_runs_at_the_inference_priority(monkeypatch, setting, priority):
    """The TensorRT backend's cuda-python stream: non-blocking, at the high priority the torch
    runtime's stream has (`stream_priority`), the default one with the adapter on a shared
    stream; a bad setting is a UserError naming the variable, and no stream is made."""
    from adapt_deploy.runtime.cuda_memory import CudaPythonMemory
    from adapt_deploy.runtime.stream_priority import STREAMS_ENV

    install_cuda_bindings_utils(monkeypatch, with_utils=True)
    if setting is None:
        monkeypatch.delenv(STREAMS_ENV, raising=False)
    else:
        monkeypatch.setenv(STREAMS_ENV, setting)
    created: list[tuple[int, int]] = []
    CudaPythonMemory(fake_cudart(Stream(0x7F00), created), 0)
    assert created == [(1, priority)]
    monkeypatch.setenv(STREAMS_ENV, "both")
    with pytest.raises(UserError, match=f"{STREAMS_ENV}: expected 'own' or 'shared'"):
        CudaPythonMemory(fake_cudart(Stream(0x7F00), created), 0)
    assert len(created) == 1


def install_cuda_bindings_utils(monkeypatch, with_utils: bool) -> None:
    """Make `from cuda.bindings.utils import get_cuda_native_handle` find a stand-in (or fail
    with ImportError, as on cuda-python releases before the utils module)."""
    cuda = types.ModuleType("cuda")
    cuda.__path__ = []  # type: ignore[attr-defined]
    bindings = types.ModuleType("cuda.bindings")
    bindings.__path__ = []  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    if not with_utils:
        monkeypatch.setitem(sys.modules, "cuda.bindings.utils", None)  # import -> ImportError
        return
    utils = types.ModuleType("cuda.bindings.utils")

    def get_cuda_native_handle(obj: Any) -> int:
        if type(obj) is not Stream:  # looked up by exact type, as cuda-python does
            raise TypeError(f"Unknown type: {type(obj)}")
        return obj.address

    utils.get_cuda_native_handle = get_cuda_native_handle  # type: ignore[attr-defined]
    bindings.utils = utils  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", utils)


def test_item21_the_stream_handle_comes_from_get_cuda_native_handle(monkeypatch):
    from adapt_deploy.runtime.cuda_memory import CudaPythonMemory

    install_cuda_bindings_utils(monkeypatch, with_utils=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # int(stream) would raise here
        memory = CudaPythonMemory(fake_cudart(Stream(0x7F00)), 0)
    assert memory.stream == 0x7F00


class OtherHandle(Stream):
    """A cuda-python type the installed get_cuda_native_handle registers no getter for."""


def test_item21_older_cuda_python_falls_back_to_int(monkeypatch):
    from adapt_deploy.runtime.cuda_memory import native_handle

    install_cuda_bindings_utils(monkeypatch, with_utils=False)  # no cuda.bindings.utils
    with pytest.warns(DeprecationWarning):
        assert native_handle(Stream(0x7F00)) == 0x7F00
    install_cuda_bindings_utils(monkeypatch, with_utils=True)
    with pytest.warns(DeprecationWarning):  # TypeError "Unknown type" from the getter
        assert native_handle(OtherHandle(6)) == 6
    assert native_handle(12345) == 12345  # cudaMalloc's pointers are plain ints already


# --------------------------------------------------------------------------------------------
# build-engine --device: the builder's GPU is made current first
# --------------------------------------------------------------------------------------------


def device_cudart(count: int, chosen: list[int]) -> SimpleNamespace:
    """A stand-in cuda-python runtime with `count` GPUs; `chosen` gets each cudaSetDevice."""
    return SimpleNamespace(
        cudaError_t=SimpleNamespace(cudaSuccess=0),
        cudaGetDeviceCount=lambda: (0, count),
        cudaSetDevice=lambda device: (chosen.append(device), (0,))[1],
    )


def test_select_device_sets_the_cuda_device_it_is_given(monkeypatch):
    chosen: list[int] = []
    monkeypatch.setattr(trt_platform, "import_cudart", lambda: device_cudart(2, chosen))
    trt_platform.select_device(1)
    assert chosen == [1]


def test_select_device_refuses_an_index_the_machine_does_not_have(monkeypatch):
    chosen: list[int] = []
    monkeypatch.setattr(trt_platform, "import_cudart", lambda: device_cudart(2, chosen))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(UserError, match=r"--device 2: no such CUDA device; this machine shows 2 "):
        trt_platform.select_device(2)
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES='2,3'"):
        trt_platform.select_device(5)
    with pytest.raises(UserError, match="got -1"):
        trt_platform.select_device(-1)
    assert chosen == []


def test_select_device_without_cuda_python_or_torch_cuda_allows_only_device_0(monkeypatch):
    monkeypatch.setattr(trt_platform, "import_cudart", lambda: None)
    monkeypatch.setattr(trt_platform, "_import_torch_cuda", lambda: None)
    trt_platform.select_device(0)  # CUDA's default device: nothing to set
    with pytest.raises(UserError, match=r"pip install cuda-python.*CUDA_VISIBLE_DEVICES=1"):
        trt_platform.select_device(1)

"""Build TensorRT engines from a bundle's ONNX on the target GPU, and load them back checked.

`adapt-deploy build-engine BUNDLE` runs `build_engines`; the runtime gets plans through
`load_engine`, which refuses an engine built for another TensorRT version or GPU (which one this
machine has is bundle/platform.py's answer). Neither imports torch, and tensorrt / cuda-python
are imported only when a build or load runs, so this module imports on any machine.

Written against the TensorRT 10.x and 11.x Python API documentation (Builder,
IBuilderConfig.set_flag / set_memory_pool_limit / create_timing_cache / set_timing_cache,
IOptimizationProfile.set_shape, OnnxParser.parse_from_file, INetworkDefinition
.mark_weights_refittable, ILayer.get_input / get_output, ITensor.dtype, Refitter
.get_all_weights, IEngineInspector.get_engine_information). NOT RUN: TensorRT cannot be
installed on our CI machines (no GPU; the PyPI wheels fetch their libraries from NVIDIA's
index). tests/test_tensorrt.py runs these paths where tensorrt and a GPU exist;
bench/tensorrt_check.py is the script for a GPU owner. Run here against stand-ins only
(tests/test_faults_tensorrt.py): which layers `_pin_fp32` pins (a fake network with the
INetworkDefinition/ILayer/ITensor surface it reads; integer reductions, integer TopK and
ArgMax are no longer pinned).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import time
from pathlib import Path
from typing import Any

from adapt_deploy import __version__
from adapt_deploy.atomic import atomic_write
from adapt_deploy.bundle.engine_files import (
    EngineError,
    EngineRecord,
    Platform,
    engine_path,
    layer_report_path,
    parse_version,
    read_engine,
    read_timing_cache,
    timing_cache_path,
    write_record,
)
from adapt_deploy.bundle.meta import load_meta
from adapt_deploy.bundle.platform import detect_platform, import_tensorrt, select_device
from adapt_deploy.errors import UserError
from adapt_deploy.export.refit import RefitPlan
from adapt_deploy.export.trt_layers import LayerReport, keep_in_fp32, parse_layer_report
from adapt_deploy.export.trt_plan import STRONG_TYPING_MAJOR, BuildInputs, prepare_build
from adapt_deploy.progress import Reporter

# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_engines(
    bundle: Path,
    fp16: bool,
    refit: bool,
    reporter: Reporter | None = None,
    *,
    timing_cache: Path | None = None,
    workspace_gb: float | None = None,
    device: int = 0,
) -> list[Path]:
    """Build the engine of CUDA `device`'s GPU for the bundle (fp16 or fp32) into
    bundle/engines; its paths.

    The bundle is validated first (meta.json, the model's sha256), then TensorRT is imported
    and `device` made current (the builder builds there, and the engine is named after that
    GPU); the plan, its layer report and its sidecar JSON are written atomically, sidecar last.
    """
    reporter = reporter or Reporter()
    bundle = Path(bundle)
    if workspace_gb is not None and not workspace_gb > 0:
        raise UserError(f"--workspace-gb: expected a positive number of GiB, got {workspace_gb}")
    meta = load_meta(bundle)
    trt = import_tensorrt()
    precision = "fp16" if fp16 else "fp32"
    inputs = prepare_build(bundle, meta, precision, trt.__version__, refit)
    select_device(device)
    here = detect_platform(trt.__version__, device)
    cache = timing_cache_path(bundle, here, timing_cache)
    return [_build_engine(trt, bundle, inputs, here, cache, workspace_gb, reporter)]


def _build_engine(
    trt: Any,
    bundle: Path,
    inputs: BuildInputs,
    here: Platform,
    cache_path: Path,
    workspace_gb: float | None,
    reporter: Reporter,
) -> Path:
    mode = inputs.mode
    plan_path = engine_path(bundle, mode.precision, here)
    reporter.log(
        f"building the {mode.precision} engine from {inputs.onnx_path.name} "
        f"(fp16: {mode.fp16_source}) for {here.describe()}; this can take minutes"
    )
    notes: list[str] = []
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _create_network(trt, builder, strongly_typed=mode.strongly_typed)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(inputs.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{inputs.onnx_path}: TensorRT's ONNX parser failed: {errors}")
    _check_input_name(network, inputs)

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # for the layer report
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if mode.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if mode.pin_fp32:
        pinned = _pin_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        notes.append(f"{pinned} layers (reductions, softmax, exp, log) pinned to fp32")
    profile = builder.create_optimization_profile()
    profile.set_shape(inputs.input_name, *(inputs.shapes[k] for k in ("min", "opt", "max")))
    config.add_optimization_profile(profile)
    refit_mode = _configure_refit(trt, network, config, inputs.refit, notes)
    _use_timing_cache(config, cache_path, notes)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineError(
            f"TensorRT could not build an engine from {inputs.onnx_path} (its log above says why)"
        )
    plan = bytes(serialized)
    atomic_write(cache_path, bytes(config.get_timing_cache().serialize()))

    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineError("TensorRT built a plan it cannot deserialize (its log above says why)")
    layers_json = _inspect(trt, engine, inputs)
    report = parse_layer_report(layers_json)
    weights = _refittable_weights(trt, engine, logger) if refit_mode != "none" else []
    _warn_precision(report, mode.precision, reporter, notes)

    atomic_write(plan_path, plan)
    atomic_write(layer_report_path(plan_path), layers_json)
    record = EngineRecord(
        engine=plan_path.name,
        engine_sha256=hashlib.sha256(plan).hexdigest(),
        tensorrt_version=here.tensorrt_version,
        gpu_name=here.gpu_name,
        compute_capability=here.compute_capability,
        precision=mode.precision,
        fp16_source=mode.fp16_source,
        onnx_model=mode.model,
        onnx_file=inputs.onnx_path.name,
        onnx_sha256=inputs.onnx_sha256,
        input_name=inputs.input_name,
        profile={k: list(v) for k, v in inputs.shapes.items()},
        refittable=refit_mode != "none",
        refit_mode=refit_mode,
        refittable_weights=weights,
        layers=report.to_dict(),
        build_seconds=round(seconds, 2),
        built_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        adapt_deploy_version=__version__,
        notes=notes,
    )
    write_record(plan_path, record)
    reporter.log(f"wrote {plan_path} in {seconds:.0f} s: {report.summary()}")
    return plan_path


def _create_network(trt: Any, builder: Any, strongly_typed: bool) -> Any:
    """TensorRT 11 networks are always strongly typed; 10.x needs the STRONGLY_TYPED flag."""
    if parse_version(trt.__version__)[0] >= STRONG_TYPING_MAJOR:
        return builder.create_network()
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    return builder.create_network(flags)


def _check_input_name(network: Any, inputs: BuildInputs) -> None:
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs.input_name not in names:
        raise EngineError(
            f"meta.json field 'input.name' is {inputs.input_name!r} but {inputs.onnx_path.name} "
            f"has inputs {names}"
        )


def _float_types(trt: Any) -> tuple[Any, ...]:
    """TensorRT's floating-point DataTypes (bfloat16 where this TensorRT has it)."""
    names = ("float32", "float16", "bfloat16")
    return tuple(getattr(trt, name) for name in names if hasattr(trt, name))


def _read_tensors(network: Any) -> set[str]:
    """Names of the tensors something reads: another layer's input or a network output."""
    names = {network.get_output(i).name for i in range(network.num_outputs)}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_inputs):
            tensor = layer.get_input(j)
            if tensor is not None:  # optional inputs that are not set
                names.add(tensor.name)
    return names


def _computes_in_float(layer: Any, floats: tuple[Any, ...], read: set[str]) -> bool:
    """Whether pinning `layer` to fp32 means anything: it reads floats (its data input 0; other
    inputs such as TopK's K are integer parameters) and writes a float tensor that is read.
    Integer reductions and TopK are left alone (fp32 precision on integer data cannot be met
    under OBEY_PRECISION_CONSTRAINTS), and so is an ArgMax, a TopK whose float values nobody
    reads, only its integer indices (fp32 there only adds a reformat: comparing fp16 values in
    fp32 gives the same indices)."""
    data = layer.get_input(0) if layer.num_inputs else None
    if data is None or data.dtype not in floats:
        return False
    outputs = (layer.get_output(j) for j in range(layer.num_outputs))
    return any(out.dtype in floats and out.name in read for out in outputs)


def _pin_fp32(trt: Any, network: Any) -> int:
    """Force the float layers `keep_in_fp32` selects to compute and output fp32 (TensorRT before
    10.12 with the FP16 flag); integer ones are left alone (see `_computes_in_float`)."""
    count = 0
    floats = _float_types(trt)
    read = _read_tensors(network)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        unary_op = None
        if layer.type == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer  # the pattern TensorRT's Python samples use
            unary_op = layer.op.name
        if not keep_in_fp32(layer.type.name, unary_op):
            continue
        if not _computes_in_float(layer, floats, read):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in floats:  # TopK indices stay integers
                layer.set_output_type(j, trt.float32)
        count += 1
    return count


def _configure_refit(
    trt: Any, network: Any, config: Any, plan: RefitPlan | None, notes: list[str]
) -> str:
    """Set REFIT_INDIVIDUAL and mark the plan's weights, or REFIT where that is not possible."""
    if plan is None:
        return "none"
    individual = (
        plan.mode == "individual"
        and hasattr(trt.BuilderFlag, "REFIT_INDIVIDUAL")
        and hasattr(network, "mark_weights_refittable")
    )
    if individual:
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        marked = [name for name in plan.weights if network.mark_weights_refittable(name)]
        if not marked:
            raise EngineError(
                f"TensorRT recognised none of the {len(plan.weights)} weights chosen for refit "
                f"(e.g. {list(plan.weights[:3])}) as network weights"
            )
        skipped = len(plan.weights) - len(marked)
        notes.append(f"refit: {len(marked)} weights marked individually ({plan.reason})")
        if skipped:
            notes.append(
                f"refit: {skipped} candidate names were not network weights (cast outputs)"
            )
        return "individual"
    config.set_flag(trt.BuilderFlag.REFIT)
    reason = plan.reason if plan.mode == "all" else "this TensorRT has no REFIT_INDIVIDUAL"
    notes.append(
        f"refit: every weight refittable ({reason}); such an engine refits from a whole ONNX "
        "file (OnnxParserRefitter), on-device adaptation (--adapt) refuses it"
    )
    return "all"


def _use_timing_cache(config: Any, path: Path, notes: list[str]) -> None:
    """Load the persisted timing cache (a fresh one when absent, damaged or from elsewhere)."""
    data = read_timing_cache(path)
    cache = None
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception:  # a damaged file: start afresh, it is rewritten after the build
            cache = None
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            notes.append(f"timing cache {path} was unusable; started a fresh one")
            cache = None
        else:
            notes.append(f"timing cache {path} reused")
    if cache is None:
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _inspect(trt: Any, engine: Any, inputs: BuildInputs) -> str:
    """The engine inspector's JSON layer report, with the input at the profile's opt shape."""
    inspector = engine.create_engine_inspector()
    context = engine.create_execution_context()
    if context is not None:
        context.set_input_shape(inputs.input_name, inputs.shapes["opt"])
        # resolves dynamic-shape formats in the report; optional per the docs
        with contextlib.suppress(AttributeError):
            inspector.execution_context = context
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


def _refittable_weights(trt: Any, engine: Any, logger: Any) -> list[str]:
    """The weight names the built engine really lets a Refitter set (proof, not intent)."""
    if not engine.refittable:
        raise EngineError("TensorRT built an engine that is not refittable although asked to")
    return sorted(trt.Refitter(engine, logger).get_all_weights())


def _warn_precision(
    report: LayerReport, precision: str, reporter: Reporter, notes: list[str]
) -> None:
    if precision != "fp16":
        return
    share = report.fp16_share
    if not share:
        message = (
            "warning: no layer of this fp16 engine computes in fp16 (see the layer report); "
            "this GPU or TensorRT chose fp32 kernels everywhere"
        )
        reporter.log(message)
        notes.append(message)


def load_engine(bundle: Path, precision: str = "fp16") -> tuple[bytes, EngineRecord]:
    """This machine's plan of `precision` and its record; refuses one built for another machine.

    Returns the serialized plan (for `trt.Runtime(logger).deserialize_cuda_engine`); the
    runtime's TensorRT backend (`adapt_deploy.runtime.tensorrt_backend`) executes it.
    """
    bundle = Path(bundle)
    meta = load_meta(bundle)
    trt = import_tensorrt()
    return read_engine(bundle, meta, precision, detect_platform(trt.__version__))

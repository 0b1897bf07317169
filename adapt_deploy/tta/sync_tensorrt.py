"""Pushing adapted weights into a TensorRT Segmenter by refitting a standby engine.

Two engines are deserialized from the same refittable plan: the segmenter runs one while the
other stands by. A push refits the standby with every re-folded conv weight
(`Refitter.set_named_weights`, by ONNX initializer name, then `refit_cuda_engine`), checks it on
the bundle's samples, and swaps it in; the engine it replaces becomes the standby. A rejected
push leaves the standby with weights that the next push overwrites in full.

Only engines built with REFIT_INDIVIDUAL (`refit_mode` "individual" in the sidecar: the
weights adaptation changes marked by ONNX initializer name) are accepted. In an engine built
with REFIT every weight is refittable, and its Refitter lists and asks for (get_all_weights /
get_missing_weights) weights under the names TensorRT's ONNX parser gave the weights it
generated or fused, which the ONNX does not have: every push would fail. Such an engine is
refused at set-up with the command that rebuilds it. (OnnxParserRefitter could refit it from a
whole rewritten ONNX on every push; the rebuild is cheaper and is the path tested here, since
build-engine --refit marks the weights of a BN-folded export individually.)

NOT RUN: written against the TensorRT 10.x / 11.x Python API (Refitter, get_all_weights,
get_weights_prototype, set_named_weights, get_missing_weights, refit_cuda_engine, Weights,
nptype); TensorRT cannot be installed on our machines. What needs no TensorRT (the refittable
check, the weight preparation) is tested everywhere; tests/test_tta_sync.py runs the rest
where tensorrt and a GPU exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from adapt_deploy.bundle.engine_files import EngineRecord, read_engine
from adapt_deploy.bundle.meta import model_path
from adapt_deploy.bundle.platform import detect_platform, import_tensorrt
from adapt_deploy.config import InputConfig
from adapt_deploy.errors import UserError
from adapt_deploy.export.folding import FoldingMap, build_folding_map
from adapt_deploy.export.refit import plan_refit_file
from adapt_deploy.models.deploy import GraphSpec
from adapt_deploy.runtime.backend import Backend
from adapt_deploy.runtime.segmenter import Segmenter
from adapt_deploy.runtime.tensorrt_backend import TensorRTBackend
from adapt_deploy.tta.push import RuntimeSync, SyncFailure


def check_refittable(record: EngineRecord, bundle: Path) -> None:
    """UserError, with the command that fixes it, for an engine adaptation cannot push into:
    one built without refit, or with REFIT instead of REFIT_INDIVIDUAL (module docstring)."""
    engine = Path(bundle) / "engines" / record.engine
    fp16 = " --fp16" if record.precision == "fp16" else ""
    rebuild = f"`adapt-deploy build-engine {bundle}{fp16} --refit`"
    if not record.refittable:
        raise UserError(
            f"{engine} was built without refit, so adapted weights cannot be pushed into it; "
            f"rebuild it on this machine with {rebuild}"
        )
    if record.refit_mode == "individual":
        return
    onnx_path = Path(bundle) / record.onnx_file
    if onnx_path.is_file() and plan_refit_file(onnx_path).mode == "all":
        raise UserError(
            f"{engine} can only be refit as a whole (REFIT): {record.onnx_file} keeps "
            "BatchNormalization nodes, which TensorRT folds into weights with generated names, "
            "so adapted weights cannot be pushed by name; re-export the bundle with "
            f"adapt-deploy export (BN folded into the convs), then rebuild with {rebuild}"
        )
    raise UserError(
        f"{engine} was built with refit mode {record.refit_mode!r} (REFIT, every weight), whose "
        "weight names are TensorRT's, not the ONNX initializers adaptation writes, so adapted "
        f"weights cannot be pushed into it; rebuild it on this machine with {rebuild} "
        "(REFIT_INDIVIDUAL)"
    )


def check_names(fmap: FoldingMap, refittable: set[str], plan: str, bundle: Path) -> None:
    """UserError when the engine cannot refit some initializer that adaptation changes."""
    missing = sorted({s.initializer for s in fmap.slots} - refittable)
    if missing:
        raise UserError(
            f"{plan}: {len(missing)} of the weights adaptation changes are not refittable in "
            f"this engine (e.g. {missing[:3]}); rebuild it with "
            f"`adapt-deploy build-engine {bundle} --refit`"
        )


def refit(
    trt: Any,
    engine: Any,
    values: dict[str, np.ndarray],
    constants: dict[str, onnx.TensorProto],
    logger: Any,
) -> None:
    """Set every named weight (in the type the engine holds it) and refit the engine. Weights
    TensorRT then still asks for get the ONNX file's values from `constants` (by initializer
    name: engines built with REFIT, whose names are the parser's, are refused at set-up by
    `check_refittable`). The arrays live until the refit is done."""
    refitter = trt.Refitter(engine, logger)
    keep: list[tuple[np.ndarray, Any]] = []

    def put(name: str, value: np.ndarray) -> None:
        array = np.ascontiguousarray(value)
        if hasattr(refitter, "get_weights_prototype"):  # TensorRT 10+: the type it holds
            prototype = refitter.get_weights_prototype(name)
            array = np.ascontiguousarray(value.astype(trt.nptype(prototype.dtype), copy=False))
            if array.size != prototype.size:
                raise SyncFailure(f"{name}: {array.size} values, the engine has {prototype.size}")
        weights = trt.Weights(array)
        keep.append((array, weights))
        if not refitter.set_named_weights(name, weights):
            raise SyncFailure(f"TensorRT refused the new values of {name} (its log says why)")

    for name, value in values.items():
        put(name, value)
    for name in refitter.get_missing_weights():
        if name not in constants:
            raise SyncFailure(f"the engine also needs weights {name!r}, which the ONNX lacks")
        put(name, numpy_helper.to_array(constants[name]))
    if not refitter.refit_cuda_engine():
        raise SyncFailure("refit_cuda_engine failed (TensorRT's log says why)")
    keep.clear()


class TensorRTSync(RuntimeSync):
    """Refit the standby engine, check it, swap; see the module docstring."""

    def __init__(
        self, segmenter: Segmenter, template: nn.Module, input_config: InputConfig, graph: GraphSpec
    ) -> None:
        super().__init__(segmenter, template, input_config, graph)
        trt = import_tensorrt()
        bundle, meta, precision = segmenter.bundle, segmenter.meta, segmenter.precision
        device = int(segmenter.device.split(":")[1])
        _, record = read_engine(bundle, meta, precision, detect_platform(trt.__version__, device))
        check_refittable(record, bundle)
        proto = onnx.load(str(model_path(bundle, meta, record.onnx_model)))
        self.map = build_folding_map(template, proto)
        self._constants = {t.name: t for t in proto.graph.initializer}
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._standby: TensorRTBackend | None = TensorRTBackend(bundle, meta, precision, device)
        try:
            names = set(trt.Refitter(self._standby.engine, self._logger).get_all_weights())
            check_names(self.map, names, record.engine, bundle)
        except BaseException:
            self.close()  # else the standby engine holds its GPU memory until collected
            raise

    def _candidate(self) -> Backend:
        standby = self._standby
        if standby is None:
            raise SyncFailure("no standby TensorRT engine (the sync was closed)")
        try:
            values = self.map.initializers(self._ref)
        except ValueError as exc:  # the exporter shared or dropped an initializer
            raise SyncFailure(f"{exc}; a built engine cannot take such weights") from None
        standby.make_current()  # refit on this thread's current device: the engine's
        refit(self._trt, standby.engine, values, self._constants, self._logger)
        return standby

    def _discard(self, candidate: Backend) -> None:
        """Kept as the standby: the next push sets all its weights again."""

    def _retire(self, old: Backend) -> None:
        self._standby = old  # type: ignore[assignment]  # swap_backend took a TensorRT one

    def close(self) -> None:
        if self._standby is not None:
            self._standby.close()
            self._standby = None

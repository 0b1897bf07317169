"""Pushing adapted weights into a running Segmenter, checked before they go live.

`make_sync(segmenter, template, input_config)` picks the way for the segmenter's backend:

- torch: a standby backend (same device, precision and CUDA-graph setting as the running one)
  takes the pushed weights in place, so its captured CUDA graphs stay valid; after a swap the
  backend it replaced is the next standby, as with TensorRT.
- onnxruntime: a new InferenceSession, built off the hot path, from the bundle's graph with
  its conv initializers replaced by the re-folded weights (`folding`). The graph is serialized
  with the new values rather than overridden with `SessionOptions.add_initializer`: in a one-off
  check on ONNX Runtime 1.31's CPU provider, such overrides of conv weights had no effect and
  raised no error at the default ENABLE_ALL optimization level (they took effect up to
  ENABLE_EXTENDED for model.onnx, up to ENABLE_LAYOUT for model_fp16.onnx). No test or
  benchmark reproduces that check.
- tensorrt: refit of a standby engine (`sync_tensorrt`).

Every push is checked on the bundle's samples before it goes live (tta/push.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import onnx
from onnx import numpy_helper
from torch import nn

from adapt_deploy.bundle.meta import model_path
from adapt_deploy.config import InputConfig
from adapt_deploy.errors import UserError
from adapt_deploy.export.folding import FoldingMap, build_folding_map, own_initializers
from adapt_deploy.models.deploy import DeployModel, GraphSpec
from adapt_deploy.runtime.backend import Backend
from adapt_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from adapt_deploy.runtime.segmenter import Segmenter
from adapt_deploy.runtime.torch_backend import ModelBackend
from adapt_deploy.tta.push import RuntimeSync, graph_spec
from adapt_deploy.tta.sync_tensorrt import TensorRTSync

MAX_PROTO_BYTES = 2_000_000_000  # protobuf cannot serialize a larger graph


# --------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------


class TorchSync(RuntimeSync):
    """Pushed weights loaded in place into a standby torch backend (made on the first push
    like the running one); the backend a swap replaces becomes the standby."""

    def __init__(
        self, segmenter: Segmenter, template: nn.Module, input_config: InputConfig, graph: GraphSpec
    ) -> None:
        super().__init__(segmenter, template, input_config, graph)
        self._standby: ModelBackend | None = None

    def _candidate(self) -> Backend:
        standby, self._standby = self._standby, None
        if standby is None:
            running = self.segmenter.current_backend()
            model = DeployModel(copy.deepcopy(self._ref), self._input_config, self._graph)
            return ModelBackend(
                model, self.segmenter.device, self.segmenter.precision, running.cuda_graph
            )
        try:
            standby.load_weights(self._ref.state_dict())
        except BaseException:
            self._standby = standby
            raise
        return standby

    def _discard(self, candidate: Backend) -> None:
        """Kept as the standby: the next push sets all its weights again."""
        self._keep(candidate)

    def _retire(self, old: Backend) -> None:
        self._keep(old)

    def _keep(self, backend: Backend) -> None:
        if isinstance(backend, ModelBackend) and self._standby is None:
            self._standby = backend
        else:
            backend.close()

    def close(self) -> None:
        if self._standby is not None:
            self._standby.close()
            self._standby = None


# --------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------


class OnnxRuntimeSync(RuntimeSync):
    """A new ONNX Runtime session on the bundle's graph with the re-folded conv weights, same
    precision, device and threads as the running one."""

    def __init__(
        self,
        segmenter: Segmenter,
        template: nn.Module,
        input_config: InputConfig,
        graph: GraphSpec,
        threads: int | None = None,
    ) -> None:
        super().__init__(segmenter, template, input_config, graph)
        path = model_path(segmenter.bundle, segmenter.meta, segmenter.precision)
        self._proto = onnx.load(str(path))
        if self._proto.ByteSize() > MAX_PROTO_BYTES:
            raise UserError(f"{path}: over 2 GB, too large to rebuild in memory for adaptation")
        checked = build_folding_map(template, self._proto)  # before the graph is rewritten
        self.map: FoldingMap = own_initializers(self._proto, checked)
        self._inits = {t.name: t for t in self._proto.graph.initializer}
        self._cuda = None if segmenter.device == "cpu" else int(segmenter.device.split(":")[1])
        running = segmenter.current_backend()
        self._cuda_graph = running.cuda_graph
        if threads is None and isinstance(running, OnnxRuntimeBackend):
            threads = running.threads
        self._threads = threads

    def _candidate(self) -> Backend:
        for name, value in self.map.initializers(self._ref).items():
            self._inits[name].CopyFrom(numpy_helper.from_array(value, name))
        meta = self.segmenter.meta
        return OnnxRuntimeBackend(
            self._proto.SerializeToString(),
            meta["input"]["layout"],
            meta["num_classes"],
            self.segmenter.precision,
            cuda_device=self._cuda,
            threads=self._threads,
            cuda_graph=self._cuda_graph,
        )


SyncFactory = Callable[[Segmenter, nn.Module, InputConfig, GraphSpec, "int | None"], RuntimeSync]
# How each runtime backend (registry.BACKENDS) takes pushed weights.
SYNCS: dict[str, SyncFactory] = {
    "torch": lambda seg, template, spec, graph, threads: TorchSync(seg, template, spec, graph),
    "onnxruntime": OnnxRuntimeSync,
    "tensorrt": lambda seg, template, spec, graph, threads: TensorRTSync(
        seg, template, spec, graph
    ),
}


def make_sync(
    segmenter: Segmenter,
    template: nn.Module,
    input_config: InputConfig,
    graph: GraphSpec | None = None,
    *,
    threads: int | None = None,
) -> RuntimeSync:
    """The sync for `segmenter`'s backend. `template`: the model the bundle was exported from
    (its checkpoint), which the bundle's graph is checked against (UserError on mismatch);
    `graph`: the deployed graph's spec (default: from meta.json); `threads`: ONNX Runtime CPU
    threads of new sessions (default: those of the running session)."""
    factory = SYNCS.get(segmenter.backend)
    if factory is None:
        raise UserError(f"on-device adaptation cannot update a {segmenter.backend!r} backend")
    return factory(segmenter, template, input_config, graph or graph_spec(segmenter.meta), threads)

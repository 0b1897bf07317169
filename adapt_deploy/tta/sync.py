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

Every push first snapshots the pushed model into a private CPU copy (the caller may keep
training), runs the new backend on the bundle's samples and compares it with the PyTorch
reference of that copy under meta.json's tolerances. Only then is it swapped in
(`Segmenter.swap_backend`); otherwise it is dropped and the runtime keeps its weights.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import numpy_helper
from torch import nn

from adapt_deploy.config import InputConfig
from adapt_deploy.errors import UserError
from adapt_deploy.export.bundle import model_path, presence_lse_k
from adapt_deploy.export.onnx_export import DeployModel, GraphSpec
from adapt_deploy.export.parity import torch_outputs
from adapt_deploy.export.verify import compare_outputs, failures, load_sample, tolerance_for
from adapt_deploy.runtime.backend import Backend, as_runner
from adapt_deploy.runtime.segmenter import Segmenter
from adapt_deploy.runtime.torch_backend import ModelBackend
from adapt_deploy.tta.folding import FoldingMap, build_folding_map, own_initializers

MAX_PROTO_BYTES = 2_000_000_000  # protobuf cannot serialize a larger graph


@dataclass
class SyncResult:
    """One push: whether it went live, how long it took, the worst sample metrics, and why not."""

    ok: bool
    seconds: float
    labels_agreement: float | None = None  # lowest over the samples
    presence_max_abs_diff: float | None = None  # highest over the samples
    reason: str | None = None


class SyncFailure(Exception):
    """A push that cannot go live; the message becomes SyncResult.reason."""


def graph_spec(meta: dict[str, Any]) -> GraphSpec:
    """The deployed graph's spec as meta.json records it."""
    return GraphSpec(
        layout=meta["input"]["layout"],
        logits=any(o.get("name") == "logits" for o in meta["outputs"]),
        lse_k=presence_lse_k(meta),
    )


def _in_range(shape: list[int], shapes: dict[str, list[int]]) -> bool:
    return all(lo <= s <= hi for lo, s, hi in zip(shapes["min"], shape, shapes["max"], strict=True))


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, SyncFailure) else f"{type(exc).__name__}: {exc}"


def running_backend(segmenter: Segmenter) -> Backend:
    """The backend the segmenter runs now (UserError once it is closed)."""
    backend = segmenter._impl
    if backend is None:
        raise UserError("this Segmenter is closed")
    return backend


class RuntimeSync:
    """Snapshot, build a candidate backend, check it on the samples, swap or drop it.
    Subclasses say how a candidate is made and what happens to the backends afterwards."""

    def __init__(
        self, segmenter: Segmenter, template: nn.Module, input_config: InputConfig, graph: GraphSpec
    ) -> None:
        self.segmenter = segmenter
        meta = segmenter.meta
        self._ref = copy.deepcopy(template).cpu().float().eval().requires_grad_(False)
        self._input_config = input_config
        self._graph = GraphSpec(layout=graph.layout, lse_k=graph.lse_k)  # labels, presence
        self._reference = DeployModel(self._ref, input_config, self._graph)
        self._layout = meta["input"]["layout"]
        self._tolerance = tolerance_for(meta, segmenter.precision)
        entries = [e for e in meta["samples"] if _in_range(list(e["shape"]), meta["shapes"])]
        if not entries:
            raise UserError(
                f"{segmenter.bundle}: no sample in meta.json has a shape within the bundle's "
                "range, so pushed weights cannot be checked; re-export the bundle"
            )
        self._samples = [(e["file"], load_sample(segmenter.bundle, e)["input"]) for e in entries]
        self._lock = threading.Lock()

    def push(self, model: nn.Module) -> SyncResult:
        """Put `model`'s current weights into the runtime if they pass the sample check; on any
        failure the runtime keeps its weights and `ok` is False with the reason."""
        start = time.perf_counter()
        with self._lock:
            candidate: Backend | None = None
            try:
                self._load(model)
                candidate = self._candidate()
                agreement, diff, problems = self._check(candidate)
            except Exception as exc:  # a failed push must never take the runtime down
                if candidate is not None:
                    self._discard(candidate)
                return SyncResult(False, time.perf_counter() - start, reason=_reason(exc))
            if problems:
                self._discard(candidate)
                reason = "the new weights fail the sample check: " + "; ".join(problems)
                return SyncResult(False, time.perf_counter() - start, agreement, diff, reason)
            try:
                old = self.segmenter.swap_backend(candidate)
            except Exception:  # closed meanwhile
                self._discard(candidate)
                raise
            self._retire(old)
            return SyncResult(True, time.perf_counter() - start, agreement, diff)

    def _load(self, model: nn.Module) -> None:
        """Copy the pushed weights into the private reference model."""
        try:
            self._ref.load_state_dict(model.state_dict())
        except RuntimeError as exc:
            raise UserError(f"the pushed model does not match the bundle's model: {exc}") from None

    def _check(self, candidate: Backend) -> tuple[float, float, list[str]]:
        """Worst label agreement, worst presence |diff| and the problems, over the samples."""
        run = as_runner(candidate, self._layout)
        agreement, diff, problems = 1.0, 0.0, []
        for name, batch in self._samples:
            metrics = compare_outputs(torch_outputs(self._reference, batch), run(batch))
            agreement = min(agreement, metrics["label_agreement"])
            diff = max(diff, metrics["presence_max_abs_diff"])
            problems += [f"{name}: {p}" for p in failures(metrics, self._tolerance)]
        return agreement, diff, problems

    def _candidate(self) -> Backend:
        """A backend running the reference model's current weights."""
        raise NotImplementedError

    def _discard(self, candidate: Backend) -> None:
        """A candidate that failed its check."""
        candidate.close()

    def _retire(self, old: Backend) -> None:
        """The backend a successful push replaced."""
        old.close()

    def close(self) -> None:
        """Release what the sync holds besides the segmenter's backend."""


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
            running = running_backend(self.segmenter)
            model = DeployModel(copy.deepcopy(self._ref), self._input_config, self._graph)
            return ModelBackend(
                model,
                self.segmenter.device,
                self.segmenter.precision,
                cuda_graph=bool(getattr(running, "cuda_graph", False)),
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
        self._cuda_graph = bool(getattr(running_backend(segmenter), "cuda_graph", False))
        if threads is None:
            session = getattr(running_backend(segmenter), "session", None)
            count = session.get_session_options().intra_op_num_threads if session else 0
            threads = count or None
        self._threads = threads

    def _candidate(self) -> Backend:
        from adapt_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

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
    graph = graph or graph_spec(segmenter.meta)
    if segmenter.backend == "torch":
        return TorchSync(segmenter, template, input_config, graph)
    if segmenter.backend == "onnxruntime":
        return OnnxRuntimeSync(segmenter, template, input_config, graph, threads)
    if segmenter.backend == "tensorrt":
        from adapt_deploy.tta.sync_tensorrt import TensorRTSync

        return TensorRTSync(segmenter, template, input_config, graph)
    raise UserError(f"on-device adaptation cannot update a {segmenter.backend!r} backend")

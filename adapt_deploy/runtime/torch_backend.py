"""PyTorch backend: the bundle's source checkpoint in PyTorch, for comparison, for on-device
adaptation (which needs the PyTorch model anyway) and for fast GPU inference without TensorRT.

The checkpoint that was exported, recorded in meta.json `checkpoint` (file name and sha256),
is looked for in the bundle's adaptation package (adapt/, written when export had the source
data), in the bundle directory and beside it; without it this backend is a clear error. The
graph is the exported one (`DeployModel`), so labels and presence mean the same as the ONNX
outputs.

Precision: fp32, or fp16 / bf16 autocast with the network in channels_last (`torch_inference`;
labels int32 and presence float32 whatever the precision). The CPU runs fp32 and bf16. On CUDA
with `cuda_graph` (what `Segmenter.from_bundle` picks there by default) the forward of each
input shape is captured once as a CUDA graph and replayed (`cuda_graphs`; the graph is
`torch_inference.graph_safe`'s, the same outputs). On CUDA the frames go through a pinned host
buffer into a static device input and labels and presence come back into pinned host buffers,
on the backend's own CUDA stream. torch is imported when a backend is made, not with this
module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapt_deploy.bundle.meta import META_FILE, presence_lse_k, sha256_file
from adapt_deploy.errors import UserError
from adapt_deploy.runtime.backend import Shape, ShapeCache, graph_shape, input_dtype

if TYPE_CHECKING:
    from adapt_deploy.models.deploy import DeployModel


def find_checkpoint(bundle: Path, meta: dict[str, Any]) -> Path:
    """The checkpoint meta.json names, in bundle/adapt/, the bundle or its parent, hash-checked."""
    bundle = Path(bundle)
    recorded = meta["checkpoint"]
    name, expected = Path(str(recorded.get("file", ""))).name, recorded.get("sha256", "")
    candidates = [bundle / "adapt" / name, bundle / name, bundle.parent / name] if name else []
    for path in candidates:
        if not path.is_file():
            continue
        if sha256_file(path) != expected:
            raise UserError(
                f"{path} is not the checkpoint this bundle was exported from: its sha256 "
                f"differs from {bundle / META_FILE} checkpoint.sha256 ({expected[:16]}…)"
            )
        return path
    where = " or ".join(str(c.parent) for c in candidates) or str(bundle)
    raise UserError(
        f"the torch backend runs the bundle's source checkpoint {name or '(none recorded)'}, "
        f"which is not in {where}; copy it there (sha256 {expected[:16]}…) or use backend "
        "'onnxruntime' or 'tensorrt', which need only the bundle"
    )


@dataclass
class _Pinned:
    """Pinned host buffers of one batch shape on CUDA: the input the Segmenter writes, and the
    labels and presence copied back from the device."""

    input: Any
    labels: Any
    presence: Any


class ModelBackend:
    """The torch backend over a DeployModel in memory, on `device` ("cpu" or "cuda:N") at
    `precision` ("fp32", "fp16" on CUDA, "bf16"); `cuda_graph`: replay CUDA graphs (CUDA only).
    It takes the model over: moved to the device, channels_last under fp16/bf16."""

    name = "torch"

    def __init__(
        self,
        model: DeployModel,
        device: str = "cpu",
        precision: str = "fp32",
        cuda_graph: bool = False,
    ) -> None:
        import torch

        from adapt_deploy.models.deploy import DeployModel
        from adapt_deploy.runtime.cuda_graphs import GraphedForward
        from adapt_deploy.runtime.cuda_streams import inference_stream
        from adapt_deploy.runtime.torch_inference import (
            LogitsInference,
            check_precision,
            graph_safe,
        )

        target = torch.device(device)
        check_precision(precision, target, "the torch backend")
        if cuda_graph and target.type != "cuda":
            raise UserError(f"the torch backend: CUDA graphs need a CUDA device, got {device!r}")
        self.device = device
        self.precision = precision
        self.cuda_graph = cuda_graph
        self.network = model.model.to(target).eval()  # the DeepLab: what weight pushes load
        wrapped = LogitsInference(self.network, precision, target.type)
        deployed = DeployModel(wrapped, model.spec, model.graph)
        self.model = graph_safe(deployed).to(target).eval()
        self._layout = model.graph.layout
        self._torch = torch
        self._cuda = target.type == "cuda"
        self._stream = inference_stream(target) if self._cuda else None  # cuda_streams
        self._dtype = torch.uint8 if input_dtype(self._layout) is np.uint8 else torch.float32
        self._forward = GraphedForward(self.model, target, self._dtype, cuda_graph, who="torch")
        self._pinned: ShapeCache[_Pinned] = ShapeCache(self._make_pinned)

    @property
    def notes(self) -> list[str]:
        """What this backend turned off while running (a CUDA graph that failed)."""
        return self._forward.notes

    @property
    def captured(self) -> list[tuple[int, ...]]:
        """The input shapes replayed from a CUDA graph now."""
        return self._forward.captured

    def _make_pinned(self, shape: Shape) -> _Pinned:
        torch = self._torch
        dims = graph_shape(shape, self._layout)
        return _Pinned(
            torch.empty(dims, dtype=self._dtype, pin_memory=True),
            torch.empty(shape, dtype=torch.int32, pin_memory=True),
            torch.empty((shape[0], self.network.num_classes), dtype=torch.float32, pin_memory=True),
        )

    def input_buffer(self, shape: Shape) -> np.ndarray:
        if self._cuda:
            return self._pinned.get(shape).input.numpy()
        return self._forward.input(graph_shape(shape, self._layout)).numpy()  # the graph's own

    def run(self, shape: Shape) -> tuple[np.ndarray, np.ndarray]:
        dims = graph_shape(shape, self._layout)
        if not self._cuda:
            labels, presence = self._forward.run(dims)[:2]
            return labels.numpy(), presence.float().numpy()
        torch = self._torch
        host = self._pinned.get(shape)
        caller = torch.cuda.current_stream(self._stream.device)
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(caller)  # after what the caller did to the weights
            self._forward.input(dims).copy_(host.input, non_blocking=True)
            labels, presence = self._forward.run(dims)[:2]
            host.labels.copy_(labels, non_blocking=True)
            host.presence.copy_(presence, non_blocking=True)
        self._stream.synchronize()
        return host.labels.numpy(), host.presence.numpy()

    def load_weights(self, state: dict[str, Any]) -> None:
        """Copy a DeepLab state dict into the network in place (captured graphs see it)."""
        torch = self._torch
        with torch.no_grad():
            self.network.load_state_dict(state)
        if self._cuda:
            torch.cuda.synchronize(self._stream.device)

    def close(self) -> None:
        self._pinned.clear()
        self._forward.close()
        self.model = self.network = None


class TorchBackend(ModelBackend):
    """The bundle's source checkpoint (`find_checkpoint`) as a ModelBackend."""

    def __init__(
        self,
        bundle: Path,
        meta: dict[str, Any],
        device: str = "cpu",
        precision: str = "fp32",
        cuda_graph: bool = False,
    ) -> None:
        from adapt_deploy.models.checkpoints import load_checkpoint
        from adapt_deploy.models.deploy import DeployModel, GraphSpec

        model, config = load_checkpoint(find_checkpoint(bundle, meta))
        graph = GraphSpec(layout=meta["input"]["layout"], lse_k=presence_lse_k(meta))
        super().__init__(DeployModel(model, config.input, graph), device, precision, cuda_graph)

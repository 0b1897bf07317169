"""PyTorch backend: the bundle's source checkpoint run eagerly (fp32), for comparison and for
on-device adaptation, which needs the PyTorch model anyway.

The checkpoint that was exported, recorded in meta.json `checkpoint` (file name and sha256),
is looked for in the bundle's adaptation package (adapt/, written when export had the source
data), in the bundle directory and beside it; without it this backend is a clear error. The
graph is the exported one (`DeployModel`), so labels and presence mean the same as the ONNX
outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from adapt_deploy.errors import UserError
from adapt_deploy.export.bundle import META_FILE, presence_lse_k, sha256_file
from adapt_deploy.runtime.backend import Shape, ShapeCache, graph_shape, input_dtype


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


class TorchBackend:
    """The exported graph in PyTorch eager mode on `device` ("cpu" or "cuda:N")."""

    name = "torch"
    precision = "fp32"

    def __init__(self, bundle: Path, meta: dict[str, Any], device: str = "cpu") -> None:
        import torch

        from adapt_deploy.export.onnx_export import DeployModel, GraphSpec
        from adapt_deploy.models.checkpoints import load_checkpoint

        model, config = load_checkpoint(find_checkpoint(bundle, meta))
        self._layout = meta["input"]["layout"]
        graph = GraphSpec(layout=self._layout, lse_k=presence_lse_k(meta))
        self.model = DeployModel(model, config.input, graph).to(device).eval()
        self.device = device
        self._torch = torch
        self._inputs: ShapeCache[np.ndarray] = ShapeCache(
            lambda shape: np.empty(graph_shape(shape, self._layout), input_dtype(self._layout))
        )

    def input_buffer(self, shape: Shape) -> np.ndarray:
        return self._inputs.get(shape)

    def run(self, shape: Shape) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        batch = torch.from_numpy(self._inputs.get(shape)).to(self.device, non_blocking=True)
        with torch.inference_mode():
            labels, presence = self.model(batch)[:2]
        return labels.cpu().numpy(), presence.float().cpu().numpy()

    def close(self) -> None:
        self._inputs.clear()
        self.model = None

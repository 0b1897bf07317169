"""A push of adapted weights into a running Segmenter, checked before it goes live: the part every
backend's sync shares (tta/sync.py picks the backend's way of making a candidate).

Every push first snapshots the pushed model into a private copy (the caller may keep
training), runs the candidate backend on the bundle's samples and compares it with the PyTorch
reference of that copy under meta.json's tolerances. Only then is it swapped in
(`Segmenter.swap_backend`); otherwise it is dropped and the runtime keeps its weights.

The copy lives where the adapter trains: on a GPU the reference runs there in fp32 (with TF32
convolutions where torch's cuDNN default allows them, as a torch fp32 runtime runs), rather than
a ResNet-101 forward per sample on the CPU at every push.

The check runs the samples of one frame (`check_samples`): a push changes the weights, not how
the graph runs a batch, which export verified once. A sample batch of several frames costs as
many reference forwards: on bench/tta's bundle a checked ONNX Runtime push took 157 ms with the
3-frame sample and 91-92 ms without it (bench/results/tta_throughput.md, before and after).
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from adapt_deploy.bundle.meta import presence_lse_k
from adapt_deploy.config import InputConfig
from adapt_deploy.errors import UserError
from adapt_deploy.export.parity import torch_outputs
from adapt_deploy.export.verify import compare_outputs, failures, load_sample, tolerance_for
from adapt_deploy.models.deploy import DeployModel, GraphSpec
from adapt_deploy.runtime.backend import Backend, as_runner
from adapt_deploy.runtime.segmenter import Segmenter


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


def check_samples(samples: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """What a push is checked on: the samples of one frame; when a bundle has none, the first
    frame of each (see the module docstring)."""
    single = [(name, batch) for name, batch in samples if batch.shape[0] == 1]
    return single or [(f"{name}[0]", batch[:1]) for name, batch in samples]


class RuntimeSync:
    """Snapshot, build a candidate backend, check it on the samples, swap or drop it.
    Subclasses say how a candidate is made and what happens to the backends afterwards."""

    def __init__(
        self, segmenter: Segmenter, template: nn.Module, input_config: InputConfig, graph: GraphSpec
    ) -> None:
        self.segmenter = segmenter
        meta = segmenter.meta
        # on the template's device: where the adapter trains (see the module docstring)
        self._ref = copy.deepcopy(template).float().eval().requires_grad_(False)
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
        self._samples = check_samples(
            [(e["file"], load_sample(segmenter.bundle, e)["input"]) for e in entries]
        )
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

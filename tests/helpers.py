"""Tiny checkpoints and bundles shared by the export, runtime and stream tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from adapt_deploy.config import ExperimentConfig, from_dict
from adapt_deploy.models.checkpoints import build_model, checkpoint_meta
from adapt_deploy.models.checkpoints import save_checkpoint as save_weights
from adapt_deploy.progress import Reporter

RGB_INPUT = {"color_order": "RGB", "mean": [123.7, 116.3, 103.5], "std": [58.4, 57.1, 57.4]}
CAFFE_INPUT = {"color_order": "BGR", "mean": [104.008, 116.669, 122.679], "std": [1.0, 1.0, 1.0]}
# Shape ranges of the shared `tiny_bundle` (N, H, W): small, so frames outside are resized.
TINY_SHAPES = {"min": [1, 16, 16], "opt": [1, 64, 96], "max": [4, 256, 512]}


def tiny_config(
    input_spec: dict, num_classes: int = 19, backbone: str = "resnet18", width: int = 8
) -> ExperimentConfig:
    """A config of a small DeepLab (ResNet-18 at width 8 by default)."""
    return from_dict(
        {
            "name": "tiny",
            "input": input_spec,
            "model": {"backbone": backbone, "width": width, "num_classes": num_classes},
            "data": {"val": {"kind": "cityscapes", "root": ".", "split": "val", "size": [32, 64]}},
        }
    )


def write_checkpoint(
    path: Path, input_spec: dict = RGB_INPUT, seed: int = 0, width: int = 8
) -> Path:
    """A randomly initialised tiny DeepLab saved as train saves it."""
    torch.manual_seed(seed)
    config = tiny_config(input_spec, width=width)
    save_weights(path, build_model(config.model), checkpoint_meta(config, 0))
    return path


def write_source_checkpoint(
    path: Path, source_root: Path, size: tuple[int, int] = (36, 64), seed: int = 0
) -> Path:
    """A tiny DeepLab whose config's data.source is the GTA5-layout `source_root` (as a run
    trained on it records), resized to `size` = (height, width)."""
    torch.manual_seed(seed)
    config = tiny_config(RGB_INPUT)
    config.data.source.root, config.data.source.size = str(source_root), list(size)
    save_weights(path, build_model(config.model), checkpoint_meta(config, 0))
    return path


def corrupting(fold: Callable) -> Callable:
    """`tta.folding.fold` with the first classifier branch's weight scaled 20x: a broken push
    that the runtime's sample check must reject."""

    def corrupted(module, pairs):
        folded = fold(module, pairs)
        weight, bias = folded["head.branches.0"]
        folded["head.branches.0"] = (weight * 20.0, bias)
        return folded

    return corrupted


def open_fake_tensorrt_backend(
    monkeypatch,
    engine: object,
    memory: Callable[[int], object],
    input_name: str,
    max_shape: list[int],
    device: int = 0,
):
    """`TensorRTBackend` set up on `engine` (None: the plan does not deserialize) with stand-ins
    for tensorrt, the GPU and CUDA memory (`memory(device)` makes it). TensorRT cannot be
    installed here, so its Python API is what is faked; the backend's own code runs."""
    from types import SimpleNamespace

    from adapt_deploy.bundle.engine_files import Platform
    from adapt_deploy.runtime import tensorrt_backend

    def logger(level: int) -> None:
        return None

    logger.WARNING = 2  # type: ignore[attr-defined]
    runtime = SimpleNamespace(deserialize_cuda_engine=lambda plan: engine)
    trt = SimpleNamespace(
        __version__="10.8.0.43", Logger=logger, Runtime=lambda log: runtime, nptype=lambda t: t
    )
    record = SimpleNamespace(engine="x.plan", input_name=input_name, profile={"max": max_shape})
    here = Platform("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_backend, "detect_platform", lambda version, device: here)
    monkeypatch.setattr(tensorrt_backend, "read_engine", lambda *a: (b"plan", record))
    monkeypatch.setattr(tensorrt_backend, "open_memory", memory)
    meta = {"input": {"layout": "NHWC"}}
    return tensorrt_backend.TensorRTBackend(Path("bundle"), meta, "fp32", device=device)


def band_model(
    path: Path, device: str = "cpu", steps: int = 30, size: tuple[int, int] = (64, 96)
) -> tuple[torch.nn.Module, ExperimentConfig, np.ndarray]:
    """A tiny DeepLab (`write_checkpoint`, saved at `path`) trained `steps` SGD steps on eight
    band scenes (conftest.scene) on `device`, in eval mode there, and four other scenes
    (N, H, W, 3) uint8. Trained, its logits have margins: a random network's near-tied logits
    say nothing about how a reduced precision treats a real model."""
    import torch.nn.functional as F
    from conftest import scene

    from adapt_deploy.data.normalize import normalize
    from adapt_deploy.models.checkpoints import load_checkpoint

    model, config = load_checkpoint(write_checkpoint(path))
    model = model.to(device)
    rng = np.random.default_rng(0)
    scenes = [scene(rng, *size) for _ in range(12)]
    images = torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image, _ in scenes])
    labels = torch.stack([torch.from_numpy(label).long() for _, label in scenes])
    images, labels = images.to(device), labels.to(device)
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, 8, (4,)).to(device)
        logits = model(normalize(images[batch], config.input))["logits"]
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        loss = F.cross_entropy(logits, labels[batch], ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), config, np.stack([image for image, _ in scenes[8:]])


def assert_same_weights(a: Path, b: Path) -> None:
    """Two runs' checkpoint.pt hold the same weights (to float tolerance): a resume's check."""
    from adapt_deploy.models.checkpoints import read_checkpoint

    first = read_checkpoint(a / "checkpoint.pt")["model"]
    second = read_checkpoint(b / "checkpoint.pt")["model"]
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6)


class StopAfter(Reporter):
    """Interrupts the job after `steps` advances of the task whose name starts with `task`."""

    def __init__(self, task: str, steps: int) -> None:
        self.task_name, self.steps, self.current, self.counts = task, steps, "", {}

    def task(self, description: str, total: int | None):
        self.current = description
        return super().task(description, total)

    def advance(self, steps: int = 1, status: str | None = None) -> None:
        self.counts[self.current] = self.counts.get(self.current, 0) + steps
        if self.current.startswith(self.task_name) and self.counts[self.current] >= self.steps:
            raise KeyboardInterrupt

"""Checkpoints: a dict of `model` weights and `meta`, written atomically, read with weights_only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from adapt_deploy import __version__
from adapt_deploy.config import ExperimentConfig, ModelConfig, from_dict
from adapt_deploy.data.labels import CLASS_NAMES
from adapt_deploy.errors import UserError
from adapt_deploy.models.deeplab import DeepLab


def build_model(cfg: ModelConfig) -> DeepLab:
    """The DeepLab a model config describes."""
    return DeepLab(cfg.backbone, cfg.num_classes, cfg.width, cfg.freeze_bn, cfg.aspp_branches)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same directory, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_meta(config: ExperimentConfig, iteration: int) -> dict[str, Any]:
    """What a checkpoint must carry to be rebuilt and deployed without its config file."""
    return {
        "architecture": config.to_dict()["model"],
        "classes": list(CLASS_NAMES[: config.model.num_classes]),
        "normalization": config.to_dict()["input"],
        "config": config.to_dict(),
        "method": config.train.method,
        "iteration": iteration,
        "version": __version__,
    }


def save_checkpoint(path: Path, model: DeepLab, meta: dict[str, Any]) -> None:
    """Write weights and meta atomically."""
    atomic_save({"model": model.state_dict(), "meta": meta}, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, checked for the `model` and `meta` entries."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise UserError(f"{path} is not a readable checkpoint: {exc}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise UserError(f"{path}: expected an adapt-deploy checkpoint with 'model' and 'meta'")
    return ckpt


def load_checkpoint(path: str | Path) -> tuple[DeepLab, ExperimentConfig]:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    ckpt = read_checkpoint(path)
    config = from_dict(ckpt["meta"]["config"], source=f"{path} (meta.config)")
    model = build_model(config.model)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise UserError(
            f"{path}: weights do not match the recorded architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), config

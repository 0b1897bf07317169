"""Checkpoints: a dict of `model` weights and `meta`, written atomically, read with weights_only."""

from __future__ import annotations

import dataclasses
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapt_deploy import __version__
from adapt_deploy.atomic import atomic_file
from adapt_deploy.config import ExperimentConfig, ModelConfig, from_dict
from adapt_deploy.errors import ConfigError, UserError
from adapt_deploy.labels import CLASS_NAMES
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.models.resnet import RESNETS
from adapt_deploy.models.weight_formats import (
    ARCH_PRESETS,
    MatchedWeights,
    detect_format,
    input_for_format,
    match_weights,
    state_dict_of,
)


def build_model(cfg: ModelConfig) -> DeepLab:
    """The DeepLab a model config describes. The backbone names are the models' own (RESNETS),
    so they are checked here, where they are defined, not in config.py."""
    if cfg.backbone not in RESNETS:
        raise ConfigError(
            f"config key 'model.backbone' must be one of {sorted(RESNETS)}, got {cfg.backbone!r}"
        )
    return DeepLab(cfg.backbone, cfg.num_classes, cfg.width, cfg.freeze_bn, cfg.aspp_branches)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same directory, then rename: never a half-written file."""
    with atomic_file(path, durable=True) as f:
        torch.save(obj, f)


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


def save_checkpoint(
    path: Path, model: DeepLab, meta: dict[str, Any], heads: dict[str, Any] | None = None
) -> None:
    """Write weights and meta atomically; a method's extra heads (LabOR's pixel selector) under
    "heads" when there are any (export and evaluation read only "model")."""
    checkpoint = {"model": model.state_dict(), "meta": meta}
    if heads:
        checkpoint["heads"] = heads
    atomic_save(checkpoint, path)


_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_weights_only(path: str | Path, what: str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, with one line naming the file and `what`
    it should be when it cannot be loaded. A file that needs more than tensors and plain
    containers is refused as such: torch's advice to retry with weights_only=False (which runs
    whatever code the file carries) is never passed on."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = _BLOCKED_GLOBAL.search(str(exc))  # a reference to a Python callable or class
        if blocked is None:  # other bytes than a pickle torch writes
            raise UserError(f"{path}: not a readable {what} (not a PyTorch file)") from None
        raise UserError(
            f"{path}: not a weights-only {what} (it refers to {blocked.group(1)}): it holds "
            "Python objects that could run code when unpickled, so it will not be loaded"
        ) from None
    except Exception as exc:  # torch raises several types for cut, damaged or foreign files
        reason = str(exc).split(". ")[0].strip() if isinstance(exc, RuntimeError) else ""
        raise UserError(
            f"{path}: not a readable {what} (cut short, damaged or not a PyTorch file"
            + (f": {reason})" if reason else ")")
        ) from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, checked for the `model` and `meta` entries."""
    path = Path(path)
    ckpt = load_weights_only(path, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise UserError(
            f"{path}: expected an adapt-deploy checkpoint with 'model' and 'meta'"
            + _foreign_hint(ckpt)
        )
    return ckpt


def _foreign_hint(obj: Any) -> str:
    """What to do with released weights (a bare state dict) given where a checkpoint is needed."""
    try:
        fmt = detect_format(list(state_dict_of(obj, "file")[0]))[0]
    except UserError:
        return ""
    return (
        f"; it holds {fmt} weights: evaluate them with --arch (one of {sorted(ARCH_PRESETS)}), "
        "or make a checkpoint with `adapt-deploy convert-weights` (docs/weights.md)"
    )


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


def mismatched_keys(
    expected: dict[str, torch.Tensor], weights: dict[str, Any]
) -> tuple[list[str], list[str], list[str]]:
    """The keys of `weights` with another shape than in `expected`, the keys it lacks, and the
    keys `expected` does not have."""
    shape = [k for k, v in expected.items() if k in weights and _shape(weights[k]) != _shape(v)]
    missing = [k for k in expected if k not in weights]
    return shape, missing, [k for k in weights if k not in expected]


def weight_mismatches(model: torch.nn.Module, weights: dict[str, Any]) -> dict[str, list[str]]:
    """How `weights` differ from `model`'s state dict: other shapes, missing and unexpected keys."""
    expected = model.state_dict()
    shape, missing, unexpected = mismatched_keys(expected, weights)
    return {
        "with another shape": [
            f"{k}: checkpoint {_shape(weights[k])} vs architecture {_shape(expected[k])}"
            for k in shape
        ],
        "missing": missing,
        "unexpected": unexpected,
    }


def check_weights(model: DeepLab, weights: dict[str, Any], arch: ModelConfig, what: str) -> None:
    """Raise a UserError listing how `weights` differ from `model` (built from `arch`)."""
    problems = weight_mismatches(model, weights)
    if any(problems.values()):
        listed = "; ".join(
            f"{len(keys)} {kind} (e.g. {', '.join(keys[:2])})"
            for kind, keys in problems.items()
            if keys
        )
        raise UserError(
            f"{what}: weights do not match the architecture ({arch.backbone}, width "
            f"{arch.width}, {arch.num_classes} classes): {listed}"
        )


def load_checkpoint(path: str | Path) -> tuple[DeepLab, ExperimentConfig]:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    ckpt = read_checkpoint(path)
    config = from_dict(ckpt["meta"]["config"], source=f"{path} (meta.config)")
    model = build_model(config.model)
    check_weights(model, ckpt["model"], config.model, f"{path} (recorded architecture)")
    model.load_state_dict(ckpt["model"])
    return model.eval(), config


def read_weights(
    path: str | Path, arch: ModelConfig, fmt: str = "auto", strict: bool = True, what: str = ""
) -> MatchedWeights:
    """The weights of a file of any supported format (models/weight_formats.py), keyed and
    shape-checked for the model `arch` describes. Read weights-only: never runs pickled code."""
    source = what or str(path)
    state, meta = state_dict_of(load_weights_only(path, "checkpoint"), source)
    expected = build_model(arch).state_dict()
    matched = match_weights(state, expected, arch, fmt, strict, source)
    matched.meta = meta
    return matched


def initial_weights(
    arch: ModelConfig, log: Callable[[str], None] | None = None
) -> dict[str, Any] | None:
    """The weights `model.init` names, keyed as the model `arch` describes (only those that load;
    load them with strict=False); None when training from scratch. `log` gets one summary line."""
    if arch.init is None:
        return None
    source = f"{arch.init} (model.init)"
    matched = read_weights(arch.init, arch, arch.init_format, arch.init_strict, source)
    if log is not None:
        log(matched.summary(source))
    return matched.weights


def _seeded_model(arch: ModelConfig, seed: int) -> DeepLab:
    """build_model with its random init drawn from `seed`, the global RNG left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch)


def convert_weights(
    src: str | Path,
    dst: str | Path,
    arch: ModelConfig,
    fmt: str = "auto",
    strict: bool = True,
    log: Callable[[str], None] | None = None,
    seed: int = 0,
) -> MatchedWeights:
    """Write `src` (any supported format) as a checkpoint of this project at `dst`, atomically.
    What the file lacks (a skipped classifier, non-strict leftovers) keeps an init seeded by
    `seed`; the meta records the input normalization the format expects."""
    matched = read_weights(src, arch, fmt, strict)
    model = _seeded_model(dataclasses.replace(arch, init=None), seed)
    model.load_state_dict(matched.weights, strict=False)
    config = ExperimentConfig(model=dataclasses.replace(arch, init=None))
    spec = input_for_format(matched.format)
    if spec is None and matched.meta is not None:  # a checkpoint of ours: keep its normalization
        spec = from_dict(matched.meta["config"], source=f"{src} (meta.config)").input
    if spec is not None:
        config.input = spec
    meta = checkpoint_meta(config, iteration=0)
    meta["converted_from"] = {"file": Path(src).name, "format": matched.format}
    save_checkpoint(Path(dst), model, meta)
    if log is not None:
        log(matched.summary(str(src)))
    return matched


def load_released(
    path: str | Path, arch: ModelConfig, fmt: str = "auto"
) -> tuple[DeepLab, ExperimentConfig]:
    """A released checkpoint (foreign weights, read strictly) built into `arch` for evaluation,
    with the config of the official protocol: Cityscapes at 512x1024 and the normalization the
    format expects. Refused when the file has no classifier for the model's classes."""
    matched = read_weights(path, arch, fmt, strict=True)
    if not matched.head_loaded:
        raise UserError(
            f"{path}: no classifier for {arch.num_classes} classes in the file "
            f"({'; '.join(matched.skipped) or matched.format}): nothing to evaluate"
        )
    model = build_model(arch)
    model.load_state_dict(matched.weights, strict=False)
    config = ExperimentConfig(model=dataclasses.replace(arch, init=None))
    if matched.meta is not None:  # a checkpoint of ours, read through --arch
        config.input = from_dict(matched.meta["config"], source=f"{path} (meta.config)").input
    else:
        config.input = input_for_format(matched.format) or config.input
    return model.eval(), config

"""The training loop: SGD with a poly schedule, atomic checkpoints, exact resume."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from adapt_deploy.adapt.losses import segmentation_loss
from adapt_deploy.config import ExperimentConfig, dump_config, from_dict
from adapt_deploy.data.datasets import build_dataset
from adapt_deploy.data.labels import CLASS_NAMES
from adapt_deploy.data.normalize import normalize
from adapt_deploy.data.segmentation import SegmentationDataset
from adapt_deploy.engine.evaluate import EvalResult, evaluate
from adapt_deploy.engine.sampling import EpochBatchSampler
from adapt_deploy.errors import ConfigError, UserError
from adapt_deploy.models.checkpoints import (
    atomic_save,
    build_model,
    checkpoint_meta,
    save_checkpoint,
)
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.progress import Reporter

CHECKPOINT = "checkpoint.pt"
TRAINER_STATE = "trainer_state.pt"
# Keys that may change between a run and its resumption.
RESUMABLE_CHANGES = (
    "train.iterations",
    "train.log_every",
    "train.checkpoint_every",
    "train.device",
    "data.num_workers",
)


@dataclass
class TrainResult:
    """Where the run left its model and how it scored."""

    checkpoint: Path
    iterations: int
    seconds: float
    evaluation: EvalResult | None


def poly_lr(base_lr: float, iteration: int, total: int, power: float) -> float:
    """The poly schedule of DeepLab: base * (1 - it / total) ** power."""
    return base_lr * max(0.0, 1.0 - iteration / total) ** power


def build_optimizer(model: DeepLab, config: ExperimentConfig) -> torch.optim.SGD:
    """SGD with the backbone at lr and the head at lr x head_lr_mult."""
    backbone, head = model.parameter_groups()
    o = config.optim
    return torch.optim.SGD(
        [{"params": backbone, "lr_mult": 1.0}, {"params": head, "lr_mult": o.head_lr_mult}],
        lr=o.lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
    )


def labelled_dataset(config: ExperimentConfig) -> SegmentationDataset:
    """What the method learns pixels from: the source set, or the target set for the oracle."""
    entry = config.data.target if config.train.method == "oracle" else config.data.source
    return build_dataset(entry, labels=True, cache=config.data.cache)


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(
    config: ExperimentConfig,
    out: Path,
    resume: bool = False,
    reporter: Reporter | None = None,
    evaluate_at_end: bool = True,
) -> TrainResult:
    """Train `config` into `out/`; with `resume`, continue from `out/trainer_state.pt`."""
    reporter = reporter or Reporter()
    out = Path(out)
    dataset = labelled_dataset(config)  # dataset errors surface before anything is written
    val = None
    if evaluate_at_end:
        val = build_dataset(config.data.val, labels=True, resize_labels=False)
    start = _prepare_out(config, out, resume)
    torch.manual_seed(config.train.seed)
    device = pick_device(config.train.device)

    model = build_model(config.model).to(device)
    optimizer = build_optimizer(model, config)
    if start > 0:
        _load_trainer_state(out, model, optimizer)
    sampler = EpochBatchSampler(len(dataset), config.train.batch_size, config.train.seed, start)
    workers = 0 if config.data.cache else config.data.num_workers
    batches = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=workers))

    total = config.train.iterations
    t0 = time.perf_counter()
    done = start  # iterations whose update has been applied
    model.train()
    with (out / "metrics.jsonl").open("a") as log, reporter.task("training", total - start):
        try:
            for iteration in range(start, total):
                metrics = train_step(model, optimizer, next(batches), config, iteration, device)
                done = iteration + 1
                if done % config.train.log_every == 0 or done == total:
                    log.write(json.dumps({"iteration": done, **metrics}) + "\n")
                    log.flush()
                reporter.advance(1, f"loss {metrics['loss']:.3f} lr {metrics['lr']:.2e}")
                if done % config.train.checkpoint_every == 0:
                    _save(out, model, optimizer, config, done)
        except KeyboardInterrupt:
            _save(out, model, optimizer, config, done)
            reporter.log(f"interrupted after iteration {done}; resume with --resume ({out})")
            raise
    _save(out, model, optimizer, config, total)
    seconds = time.perf_counter() - t0
    result = None
    if val is not None:
        with reporter.task("evaluating", len(val)):
            result = evaluate(
                model,
                val,
                config.input,
                list(CLASS_NAMES[: config.model.num_classes]),
                progress=lambda done, n: reporter.advance(1),
            )
        (out / "eval.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return TrainResult(out / CHECKPOINT, total, seconds, result)


def train_step(
    model: DeepLab,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    config: ExperimentConfig,
    iteration: int,
    device: torch.device,
) -> dict[str, float]:
    """One SGD step on a labelled batch; returns the loss and the lr used."""
    o = config.optim
    lr = poly_lr(o.lr, iteration, o.schedule_iters, o.poly_power)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    images = normalize(batch["image"].to(device), config.input)
    loss = segmentation_loss(model(images)["logits"], batch["label"].to(device))
    if not math.isfinite(loss.item()):
        raise UserError(f"loss became {loss.item()} at iteration {iteration}; lower optim.lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    optimizer.step()
    return {"loss": loss.item(), "lr": lr}


def _prepare_out(config: ExperimentConfig, out: Path, resume: bool) -> int:
    """Create the run directory; on resume check the config and return the start iteration."""
    state = out / TRAINER_STATE
    if resume:
        if not state.is_file():
            raise UserError(f"nothing to resume: {state} does not exist")
        saved = from_dict(_read_yaml(out / "config.yaml"), source=str(out / "config.yaml"))
        _check_resumable(saved, config, out)
        start = int(torch.load(state, map_location="cpu", weights_only=True)["iteration"])
        if start >= config.train.iterations:
            raise UserError(
                f"{out} already ran {start} iterations; raise train.iterations to continue"
            )
    else:
        if (out / CHECKPOINT).exists() or state.exists():
            raise UserError(f"{out} already holds a run; pass --resume or choose another --out")
        start = 0
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "config.yaml")
    return start


def _read_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _check_resumable(saved: ExperimentConfig, new: ExperimentConfig, out: Path) -> None:
    old, cur = _flatten(saved.to_dict()), _flatten(new.to_dict())
    diffs = [k for k in cur if old.get(k) != cur[k]]
    blocking = [k for k in diffs if k not in RESUMABLE_CHANGES]
    if blocking:
        raise ConfigError(
            f"cannot resume {out}: config differs from the saved run in {blocking}; "
            f"only {list(RESUMABLE_CHANGES)} may change"
        )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _save(
    out: Path,
    model: DeepLab,
    optimizer: torch.optim.Optimizer,
    config: ExperimentConfig,
    iteration: int,
) -> None:
    """Model checkpoint and trainer state, each atomically."""
    save_checkpoint(out / CHECKPOINT, model, checkpoint_meta(config, iteration))
    atomic_save(
        {"iteration": iteration, "optimizer": optimizer.state_dict(), "model": model.state_dict()},
        out / TRAINER_STATE,
    )


def _load_trainer_state(out: Path, model: DeepLab, optimizer: torch.optim.Optimizer) -> None:
    state = torch.load(out / TRAINER_STATE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])

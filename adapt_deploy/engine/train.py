"""The training loop: SGD with a poly schedule, mixed precision, atomic checkpoints, exact
resume."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from adapt_deploy import registry
from adapt_deploy.adapt.base import Method
from adapt_deploy.config import ExperimentConfig, dump_config, from_dict
from adapt_deploy.data.datasets import build_dataset
from adapt_deploy.engine.evaluate import EvalResult, evaluate
from adapt_deploy.engine.method_data import labelled_dataset, target_dataset
from adapt_deploy.engine.precision import MixedPrecision, cudnn_benchmark
from adapt_deploy.engine.sampling import EpochBatchSampler, without_worker_tracebacks
from adapt_deploy.errors import ConfigError, UserError
from adapt_deploy.labels import CLASS_NAMES
from adapt_deploy.models.checkpoints import (
    atomic_save,
    build_model,
    checkpoint_meta,
    initial_weights,
    load_weights_only,
    save_checkpoint,
)
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.progress import Reporter
from adapt_deploy.signals import StopOnSignals

CHECKPOINT = "checkpoint.pt"
COMPILE_BACKEND = "inductor"  # train.compile's torch.compile backend
TRAINER_STATE = "trainer_state.pt"
# Keys that may change between a run and its resumption.
RESUMABLE_CHANGES = (
    "train.iterations",
    "optim.schedule_iters",
    "train.log_every",
    "train.checkpoint_every",
    "train.device",
    "train.precision",
    "train.compile",
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


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Learner:
    """The model, the method's recipe, every optimizer and the precision policy: what one
    iteration updates. `model` is the module itself (its state is the checkpoint); the method
    may run a compiled wrapper of it (train.compile)."""

    model: DeepLab
    method: Method
    optimizer: torch.optim.SGD
    d_optimizers: dict[str, torch.optim.Optimizer]
    amp: MixedPrecision

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the iteration."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "discriminators": {k: d.state_dict() for k, d in self.method.discriminators.items()},
            "d_optimizers": {k: o.state_dict() for k, o in self.d_optimizers.items()},
            "method": self.method.extra_state(),
            "scaler": self.amp.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for k, d in self.method.discriminators.items():
            d.load_state_dict(state["discriminators"][k])
        for k, o in self.d_optimizers.items():
            o.load_state_dict(state["d_optimizers"][k])
        self.method.load_extra_state(state.get("method", {}))  # absent in older trainer states
        self.amp.load_state_dict(state.get("scaler", {}))


def build_learner(
    config: ExperimentConfig, device: torch.device, init: dict[str, Any] | None = None
) -> Learner:
    """Model (from `init` weights when given), method (with its discriminators), optimizers
    and the precision policy (channels_last on CUDA; torch.compile when train.compile)."""
    amp = MixedPrecision(config.train.precision, device)
    model = build_model(config.model)
    if init is not None:
        model.load_state_dict(init)
    model = model.to(device, memory_format=amp.memory_format)
    forward = torch.compile(model, backend=COMPILE_BACKEND) if config.train.compile else model
    method: Method = registry.METHODS.load(config.train.method)(config, forward, device)
    method.memory_format = amp.memory_format
    for discriminator in method.discriminators.values():
        discriminator.to(memory_format=amp.memory_format)
    optimizer = build_optimizer(model, config)
    return Learner(model, method, optimizer, method.optimizers(), amp)


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
    method_cls: type[Method] = registry.METHODS.load(config.train.method)
    # Dataset and init-weight errors surface before anything is written.
    init = None if resume else initial_weights(config.model)  # resume: the state has them
    labelled = labelled_dataset(config, method_cls, reporter)
    target = target_dataset(config, method_cls)
    val = None
    if evaluate_at_end:
        val = build_dataset(config.data.val, labels=True, resize_labels=False)
    state = _prepare_out(config, out, resume)  # read once: it holds every optimizer's moments
    start = state["iteration"] if state is not None else 0
    torch.manual_seed(config.train.seed)
    device = pick_device(config.train.device)
    learner = build_learner(config, device, init)
    if state is not None:
        _load_state(learner, state, out / TRAINER_STATE)
        del state
    workers = 0 if config.data.cache else config.data.num_workers
    batch, seed = config.train.batch_size, config.train.seed
    sources = _batches(labelled, batch, seed, start, workers)
    targets = _batches(target, batch, seed + 1, start, workers) if target is not None else None

    total = config.train.iterations
    t0 = time.perf_counter()
    done = start  # iterations whose update has been applied
    learner.model.train()
    with (
        cudnn_benchmark(device),
        (out / "metrics.jsonl").open("a") as log,
        reporter.task("training", total - start),
        StopOnSignals() as stop,  # SIGTERM (docker stop, a preempted job) saves as Ctrl-C does
    ):
        try:
            for iteration in range(start, total):
                target_batch = next(targets) if targets is not None else None
                metrics = train_step(learner, next(sources), target_batch, config, iteration)
                done = iteration + 1
                if done % config.train.log_every == 0 or done == total:
                    log.write(json.dumps({"iteration": done, **metrics}) + "\n")
                    log.flush()
                reporter.advance(1, f"loss {metrics['loss']:.3f} lr {metrics['lr']:.2e}")
                if done % config.train.checkpoint_every == 0:
                    _save(out, learner, config, done)
        except KeyboardInterrupt:
            with stop.deferred():  # a second signal must not cut the save short
                _save(out, learner, config, done)
            why = f"stopped by {stop.name}" if stop.name else "interrupted"
            reporter.log(f"{why} after iteration {done}: state saved; resume with --resume ({out})")
            raise
    _save(out, learner, config, total)
    seconds = time.perf_counter() - t0
    result = None
    if val is not None:
        with reporter.task("evaluating", len(val)):
            result = evaluate(
                learner.model,
                val,
                config.input,
                list(CLASS_NAMES[: config.model.num_classes]),
                progress=lambda done, n: reporter.advance(1),
                protocol=config.train.eval_protocol,
            )
        (out / "eval.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return TrainResult(out / CHECKPOINT, total, seconds, result)


def _batches(dataset: Dataset, batch: int, seed: int, start: int, workers: int) -> Iterator:
    """An endless iterator of batches whose i-th batch is the same in a resumed run."""
    sampler = EpochBatchSampler(len(dataset), batch, seed, start)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    return without_worker_tracebacks(loader)


def train_step(
    learner: Learner,
    source: dict[str, Any],
    target: dict[str, Any] | None,
    config: ExperimentConfig,
    iteration: int,
) -> dict[str, float]:
    """One iteration with the official order and detach semantics; returns the losses and lr."""
    o, method = config.optim, learner.method
    lr = poly_lr(o.lr, iteration, o.schedule_iters, o.poly_power)
    for group in learner.optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    lr_d = poly_lr(config.adapt.lr_d, iteration, o.schedule_iters, o.poly_power)
    for opt in learner.d_optimizers.values():
        for group in opt.param_groups:
            group["lr"] = lr_d
    learner.optimizer.zero_grad(set_to_none=True)
    for opt in learner.d_optimizers.values():
        opt.zero_grad(set_to_none=True)

    amp = learner.amp
    _require_grad(method.discriminators.values(), False)  # generator losses only train G
    with amp.autocast():
        losses = method.source_losses(source)
    values = _backward(losses, iteration, amp)
    if target is not None:
        with amp.autocast():
            losses = method.target_losses(target)
        values |= _backward(losses, iteration, amp)
    _require_grad(method.discriminators.values(), True)
    with amp.autocast():
        losses = method.discriminator_losses()
    values |= _backward(losses, iteration, amp)

    clip = (learner.model.parameters(), o.grad_clip) if o.grad_clip > 0 else None
    amp.step([learner.optimizer, *learner.d_optimizers.values()], clip)
    generator = sum(v for k, v in values.items() if not k.startswith("d_"))
    return {"loss": generator, **values, "lr": lr}


def _backward(
    losses: dict[str, torch.Tensor], iteration: int, amp: MixedPrecision
) -> dict[str, float]:
    """Backpropagate the sum of `losses` (scaled under fp16); their values for the log; stop on
    a non-finite one."""
    if not losses:
        return {}
    values = {k: v.item() for k, v in losses.items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise UserError(
            f"loss {bad[0]} became {values[bad[0]]} at iteration {iteration}; lower optim.lr"
        )
    amp.backward(sum(losses.values()))
    return values


def _require_grad(modules: Iterable[torch.nn.Module], flag: bool) -> None:
    for module in modules:
        module.requires_grad_(flag)


def _prepare_out(config: ExperimentConfig, out: Path, resume: bool) -> dict[str, Any] | None:
    """Create the run directory; on resume check the config and return the trainer state."""
    path = out / TRAINER_STATE
    state = None
    if resume:
        if not path.is_file():
            raise UserError(f"nothing to resume: {path} does not exist")
        saved = from_dict(_read_yaml(out / "config.yaml"), source=str(out / "config.yaml"))
        _check_resumable(saved, config, out)
        state = _read_state(path)
        if state["iteration"] >= config.train.iterations:
            raise UserError(
                f"{out} already ran {state['iteration']} iterations; raise train.iterations "
                "to continue"
            )
    elif (out / CHECKPOINT).exists() or path.exists():
        raise UserError(f"{out} already holds a run; pass --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "config.yaml")
    return state


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


def _save(out: Path, learner: Learner, config: ExperimentConfig, iteration: int) -> None:
    """Model checkpoint and trainer state, each atomically."""
    save_checkpoint(out / CHECKPOINT, learner.model, checkpoint_meta(config, iteration))
    atomic_save({"iteration": iteration, **learner.state_dict()}, out / TRAINER_STATE)


STATE_KEYS = ("iteration", "model", "optimizer", "discriminators", "d_optimizers")


def _read_state(path: Path) -> dict[str, Any]:
    """The trainer state at `path`, checked for its entries; UserError naming the file."""
    state = load_weights_only(path, "trainer state")
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{path}: not a trainer state of adapt-deploy (no {missing[0]!r} entry)")
    if not isinstance(state["iteration"], int) or state["iteration"] < 0:
        raise UserError(
            f"{path}: field 'iteration' must be a count of iterations, got {state['iteration']!r}"
        )
    return state


def _load_state(learner: Learner, state: dict[str, Any], path: Path) -> None:
    """Resume `learner` from the trainer state read from `path`; UserError when it is from
    another run."""
    try:
        learner.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{path}: does not fit this run's model, method or optimizers ({detail[:200]})"
        ) from None

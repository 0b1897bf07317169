"""The training loop: SGD with a poly schedule, mixed precision, atomic checkpoints, exact
resume, data-parallel processes under torchrun, periodic evaluation with the best checkpoint."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from adapt_deploy import registry
from adapt_deploy.adapt.base import Method, RunContext
from adapt_deploy.atomic import atomic_file
from adapt_deploy.config import ExperimentConfig, dump_config, from_dict
from adapt_deploy.data.datasets import build_dataset
from adapt_deploy.data.multi_source import MultiSourceDataset
from adapt_deploy.engine import distributed
from adapt_deploy.engine.distributed import World
from adapt_deploy.engine.evaluate import EvalResult, evaluate
from adapt_deploy.engine.method_data import labelled_dataset, source_class_counts, target_dataset
from adapt_deploy.engine.overlays import prediction_overlays
from adapt_deploy.engine.precision import MixedPrecision, cudnn_benchmark
from adapt_deploy.engine.run_log import RunLog, check_tensorboard
from adapt_deploy.engine.sampling import (
    EpochBatchSampler,
    MultiSourceBatchSampler,
    RareClassBatchSampler,
    batch_shard,
    without_worker_tracebacks,
)
from adapt_deploy.engine.source_style import TargetStyle
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
from adapt_deploy.signals import SignalInterrupt, StopOnSignals

CHECKPOINT = "checkpoint.pt"
ONE_PROCESS = World()
BEST_CHECKPOINT = "best.pt"
BEST_RECORD = "best.json"
COMPILE_BACKEND = "inductor"  # train.compile's torch.compile backend
TRAINER_STATE = "trainer_state.pt"
STOP = "stop requested"  # the per-iteration vote on stopping, averaged with the losses
# Keys that may change between a run and its resumption.
RESUMABLE_CHANGES = (
    "train.iterations",
    "optim.schedule_iters",
    "train.log_every",
    "train.checkpoint_every",
    "train.device",
    "train.precision",
    "train.compile",
    "train.eval_every",
    "train.tensorboard",
    "data.num_workers",
)


@dataclass
class TrainResult:
    """Where the run left its model and how it scored (`primary`: this process is rank 0, the
    one that wrote them; the others return without an evaluation)."""

    checkpoint: Path
    iterations: int
    seconds: float
    evaluation: EvalResult | None
    primary: bool = True


def poly_lr(base_lr: float, iteration: int, total: int, power: float) -> float:
    """The poly schedule of DeepLab: base * (1 - it / total) ** power."""
    return base_lr * max(0.0, 1.0 - iteration / total) ** power


def build_optimizer(
    model: DeepLab, config: ExperimentConfig, extra_heads: Iterable[torch.nn.Module] = ()
) -> torch.optim.SGD:
    """SGD with the backbone at lr and the head, and a method's extra heads, at lr x
    head_lr_mult."""
    backbone, head = model.parameter_groups()
    head = head + [p for module in extra_heads for p in module.parameters() if p.requires_grad]
    o = config.optim
    return torch.optim.SGD(
        [{"params": backbone, "lr_mult": 1.0}, {"params": head, "lr_mult": o.head_lr_mult}],
        lr=o.lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
    )


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU (one process; see distributed.pick_device)."""
    return distributed.pick_device(name, World())


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
        """Everything a resumed run needs besides the iteration (the same for any number of
        processes: wrapped discriminators are saved as their modules)."""
        discriminators = self.method.discriminators.items()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "discriminators": {k: distributed.unwrap(d).state_dict() for k, d in discriminators},
            "heads": self.head_weights(),
            "d_optimizers": {k: o.state_dict() for k, o in self.d_optimizers.items()},
            "method": self.method.extra_state(),
            "scaler": self.amp.state_dict(),
        }

    def head_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """The method's extra heads' weights by name (saved in checkpoints and trainer states)."""
        return {k: distributed.unwrap(h).state_dict() for k, h in self.method.heads.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for k, h in self.method.heads.items():
            distributed.unwrap(h).load_state_dict(state["heads"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        for k, d in self.method.discriminators.items():
            distributed.unwrap(d).load_state_dict(state["discriminators"][k])
        for k, o in self.d_optimizers.items():
            o.load_state_dict(state["d_optimizers"][k])
        self.method.load_extra_state(state.get("method", {}))  # absent in older trainer states
        self.amp.load_state_dict(state.get("scaler", {}))


def build_learner(
    config: ExperimentConfig,
    device: torch.device,
    init: dict[str, Any] | None = None,
    world: World | None = None,
) -> Learner:
    """Model (from `init` weights when given: the keys model.init loads), method (with its
    discriminators), optimizers and the precision policy (channels_last on CUDA; torch.compile
    when train.compile). With several processes the network and the discriminators run in
    DistributedDataParallel; `Learner.model` is always the module itself."""
    world = world or World()
    amp = MixedPrecision(config.train.precision, device)
    model = build_model(config.model)
    if init is not None:  # checked against the architecture by initial_weights
        model.load_state_dict(init, strict=False)
    model = model.to(device, memory_format=amp.memory_format)
    method: Method = registry.METHODS.load(config.train.method)(config, model, device)
    forward = distributed.wrap_segmenter(model, world, device)
    if config.train.compile:
        forward = torch.compile(forward, backend=COMPILE_BACKEND)
    method.model = forward
    method.memory_format = amp.memory_format
    for name, discriminator in method.discriminators.items():
        discriminator.to(memory_format=amp.memory_format)
        method.discriminators[name] = distributed.wrap_discriminator(discriminator, world, device)
    heads = list(method.heads.values())
    for name, head in method.heads.items():
        method.heads[name] = distributed.wrap_discriminator(head, world, device)
    optimizer = build_optimizer(model, config, heads)
    return Learner(model, method, optimizer, method.optimizers(), amp)


def train(
    config: ExperimentConfig,
    out: Path,
    resume: bool = False,
    reporter: Reporter | None = None,
    evaluate_at_end: bool = True,
    world: World | None = None,
) -> TrainResult:
    """Train `config` into `out/`; with `resume`, continue from `out/trainer_state.pt`.

    Under torchrun (`world` from its environment unless given) each process trains on its shard
    of every global batch; rank 0 alone writes the checkpoints, logs and progress."""
    world = world or distributed.world_from_env()
    reporter = (reporter or Reporter()) if world.primary else Reporter()
    out = Path(out)
    distributed.check_global_batch(config.train.batch_size, world)
    check_tensorboard(config.train.tensorboard)
    method_cls: type[Method] = registry.METHODS.load(config.train.method)
    # Dataset and init-weight errors surface before anything is written.
    init = None if resume else initial_weights(config.model, log=reporter.log)
    labelled = labelled_dataset(config, method_cls, reporter)
    target = target_dataset(config, method_cls)
    style_images = _fda_targets(config, method_cls)
    val = None
    if evaluate_at_end or config.train.eval_every:
        val = build_dataset(config.data.val, labels=True, resize_labels=False)
    state = _prepare_out(config, out, resume, world)  # read once: every optimizer's moments
    start = state["iteration"] if state is not None else 0
    device = distributed.pick_device(config.train.device, world)
    with distributed.process_group(world, device), distributed.method_collectives(world):
        torch.manual_seed(config.train.seed)  # the same initial weights in every process
        learner = build_learner(config, device, init, world)
        if world.rank:  # its own global stream; the methods seed their draws per iteration
            torch.manual_seed(config.train.seed + 1_000_003 * world.rank)
        if state is not None:
            _load_state(learner, state, out / TRAINER_STATE)
            del state
        context = RunContext(
            out, target, learner.model, start, reporter, world.primary,
            lambda: distributed.barrier(world),
        )  # fmt: skip
        learner.method.attach(context)
        data = (labelled, target, val)
        style = None
        if style_images is not None:
            beta, batch = config.data.fda_beta, config.train.batch_size
            shard = batch_shard(batch, *world.shard)
            style = TargetStyle(style_images, beta, config.train.seed, batch, shard, device)
        result = _run(config, out, learner, data, start, reporter, world, evaluate_at_end, style)
        # Free the learner (DistributedDataParallel's reducer holds the process group) while
        # the group is whole, before the processes leave it. Without this, rank 1 of a finished
        # 2-process gloo run aborted in interpreter finalization ("terminate called without an
        # active exception") in 5 of 20 runs; with it, in none of 48 (one-off loops of
        # bench.train_scaling's 2-process source_only run). Measured, not explained.
        del learner, context, style
        gc.collect()
    return result


def _fda_targets(config: ExperimentConfig, method: type[Method]) -> Dataset | None:
    """The target train images FDA takes the style of (data.fda_beta > 0), else None;
    ConfigError for a method whose labelled batches are target images already."""
    if not config.data.fda_beta:
        return None
    if method.name == "oracle" or method.trains_on_ranked_target:
        raise ConfigError(
            f"data.fda_beta must be 0 for train.method {method.name}: its labelled batches are "
            f"target images, got {config.data.fda_beta}"
        )
    return build_dataset(config.data.target, labels=False, cache=config.data.cache)


def _run(
    config: ExperimentConfig,
    out: Path,
    learner: Learner,
    data: tuple[Dataset, Dataset | None, Dataset | None],
    start: int,
    reporter: Reporter,
    world: World,
    evaluate_at_end: bool,
    style: TargetStyle | None = None,
) -> TrainResult:
    """The iterations from `start` on, the periodic evaluations and the final one; `data` is
    (labelled, target, val); `style` restyles each source batch (FDA) when given."""
    labelled, target, val = data
    device = learner.method.device
    workers = 0 if config.data.cache else config.data.num_workers
    batch, seed = config.train.batch_size, config.train.seed
    if learner.method.source_sampling == "rare_class" and config.selftrain.rare_class_temperature:
        counts = source_class_counts(config, labelled, reporter)
        temperature = config.selftrain.rare_class_temperature
        sampler = RareClassBatchSampler(counts, batch, seed, temperature, start, *world.shard)
        sources = _loader(labelled, sampler, workers)
    elif isinstance(labelled, MultiSourceDataset):
        mixing = config.data.source_mixing
        sampler = MultiSourceBatchSampler(labelled.sizes, batch, seed, mixing, start, *world.shard)
        sources = _loader(labelled, sampler, workers)
    else:
        sources = _batches(labelled, batch, seed, start, workers, world)
    targets = _batches(target, batch, seed + 1, start, workers, world) if target else None
    total, every = config.train.iterations, config.train.eval_every
    best = _read_best(out) if world.primary and start > 0 else None  # a resumed run's record
    t0 = time.perf_counter()
    done = start  # iterations whose update has been applied
    learner.model.train()
    with (
        cudnn_benchmark(device),
        _run_log(out, start, config, world) as log,
        reporter.task("training", total - start),
        StopOnSignals() as stop,  # SIGTERM (docker stop, a preempted job) saves as Ctrl-C does
        stop.at_boundaries(),  # ... after the iteration under way
    ):
        try:
            window = (time.perf_counter(), done)  # images/s over each logging interval
            for iteration in range(start, total):
                learner.method.before_iteration(iteration)
                target_batch = next(targets) if targets is not None else None
                source_batch = next(sources)
                if style is not None:
                    source_batch = style(source_batch, iteration)
                metrics = train_step(learner, source_batch, target_batch, config, iteration)
                done = iteration + 1
                metrics[STOP] = float(stop.requested)  # every process stops after the same one
                metrics = distributed.average(metrics, world, device)  # the global batch's
                stopping = metrics.pop(STOP) > 0
                if log is not None and (done % config.train.log_every == 0 or done == total):
                    now = time.perf_counter()
                    rate = batch * (done - window[1]) / max(now - window[0], 1e-9)
                    log.log_train(done, metrics, rate)
                    window = (now, done)
                reporter.advance(1, f"loss {metrics['loss']:.3f} lr {metrics['lr']:.2e}")
                if world.primary and done % config.train.checkpoint_every == 0:
                    _save(out, learner, config, done)
                if stopping:
                    raise SignalInterrupt(stop.signum) if stop.signum else PeerStopped()
                if val is not None and every and done % every == 0 and done < total:
                    result = _evaluate(learner, val, config, world, reporter)
                    best = _record_eval(out, learner, config, done, result, val, log, best)
                    learner.model.train()
        except (KeyboardInterrupt, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not world.distributed:
                raise  # a bug, not a stop: nothing to tell apart from a peer that stopped
            if world.primary:
                with stop.deferred():  # a second signal must not cut the save short
                    _save(out, learner, config, done)
            if isinstance(exc, KeyboardInterrupt):
                why = f"stopped by {stop.name}" if stop.name else "interrupted"
                reporter.log(
                    f"{why} after iteration {done}: state saved; resume with --resume ({out})"
                )
                raise
            saved = f"state saved in {out}" if world.primary else "rank 0 saves the state"
            raise UserError(
                f"training process {world.rank} of {world.size} stopped after iteration {done} "
                f"({str(exc).strip().splitlines()[0][:200]}; a process that stops or fails stops "
                f"the others); {saved}, resume with --resume"
            ) from exc
        if world.primary:
            _save(out, learner, config, total)
        seconds = time.perf_counter() - t0
        result = None
        if val is not None and (evaluate_at_end or (every and total % every == 0)):
            result = _evaluate(learner, val, config, world, reporter)
            best = _record_eval(out, learner, config, total, result, val, log, best)
            if world.primary:
                (out / "eval.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return TrainResult(out / CHECKPOINT, total, seconds, result, world.primary)


def _run_log(out: Path, start: int, config: ExperimentConfig, world: World):
    """Rank 0's metrics.jsonl and TensorBoard writer; nothing in the other processes."""
    if not world.primary:
        return contextlib.nullcontext(None)
    return RunLog(out, start=start, tensorboard=config.train.tensorboard)


def _evaluate(
    learner: Learner, val: Dataset, config: ExperimentConfig, world: World, reporter: Reporter
) -> EvalResult:
    """mIoU on the val split, each process evaluating its shard of it (one confusion matrix)."""
    shard = Subset(val, range(world.rank, len(val), world.size)) if world.distributed else val
    names = list(CLASS_NAMES[: config.model.num_classes])
    with reporter.task("evaluating", len(shard)):
        result = evaluate(
            learner.model,
            shard,
            config.input,
            names,
            progress=lambda done, n: reporter.advance(1),
            protocol=config.train.eval_protocol,
        )
    if not world.distributed:
        return result
    confusion = torch.from_numpy(result.confusion).to(learner.method.device)
    distributed.sum_over_processes(confusion, world)
    return EvalResult(confusion.cpu().numpy(), names, config.train.eval_protocol)


def _record_eval(
    out: Path,
    learner: Learner,
    config: ExperimentConfig,
    iteration: int,
    result: EvalResult,
    val: Dataset,
    log: RunLog | None,
    best: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """Rank 0 logs an evaluation (with a few val predictions as overlays in TensorBoard) and
    keeps the best model so far as best.pt (its iteration and mIoU in best.json); returns the
    best record. The other processes (`log` None) do nothing."""
    if log is None:
        return best
    overlays = prediction_overlays(learner.model, val, config.input) if log.tensorboard_on else None
    log.log_eval(iteration, result, overlays)
    miou = 100 * result.miou
    if best is not None and not miou > best["miou"]:
        return best
    meta = checkpoint_meta(config, iteration)
    save_checkpoint(out / BEST_CHECKPOINT, learner.model, meta, learner.head_weights())
    best = {"iteration": iteration, "miou": round(miou, 4)}
    with atomic_file(out / BEST_RECORD) as f:
        f.write((json.dumps(best) + "\n").encode())
    return best


def _read_best(out: Path) -> dict[str, Any] | None:
    """The best evaluation of a resumed run (best.json), None before the first."""
    path = out / BEST_RECORD
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
        return {"iteration": int(best["iteration"]), "miou": float(best["miou"])}
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"{path}: expected {{'iteration': N, 'miou': X}} (the best evaluation so far); "
            "delete it to start the best.pt record afresh"
        ) from None


def _batches(
    dataset: Dataset, batch: int, seed: int, start: int, workers: int, world: World = ONE_PROCESS
) -> Iterator:
    """An endless iterator of this process's shards of the global batches; the i-th is the same
    in a resumed run, whatever the number of processes."""
    sampler = EpochBatchSampler(len(dataset), batch, seed, start, *world.shard)
    return _loader(dataset, sampler, workers)


def _loader(dataset: Dataset, sampler: Sampler, workers: int) -> Iterator:
    """The batches `sampler` draws from `dataset`, a worker's UserError as its own message."""
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    return without_worker_tracebacks(loader)


class PeerStopped(KeyboardInterrupt):
    """Another training process was stopped by a signal: this one stops after the same
    iteration."""


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

    clipped = [
        *learner.model.parameters(),
        *(p for h in method.heads.values() for p in h.parameters()),
    ]
    clip = (clipped, o.grad_clip) if o.grad_clip > 0 else None
    amp.step([learner.optimizer, *learner.d_optimizers.values()], clip)
    method.after_step(iteration)
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


def _prepare_out(
    config: ExperimentConfig, out: Path, resume: bool, world: World
) -> dict[str, Any] | None:
    """Create the run directory (rank 0); on resume check the config and return the trainer
    state (every process reads it)."""
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
    if world.primary:
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
    meta = checkpoint_meta(config, iteration)
    save_checkpoint(out / CHECKPOINT, learner.model, meta, learner.head_weights())
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

"""Data-parallel training on torch's own engine: torchrun's environment, DistributedDataParallel
and the few collectives the trainer needs.

One process without torchrun is the same code with a world of one: nothing is wrapped and no
collective runs. Under torchrun every process builds the same model from the same seed, trains
on its shard of each global batch (engine/sampling.py), and DistributedDataParallel averages the
gradients, so N processes take the step one process takes on the whole batch.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adapt_deploy.adapt import data_parallel
from adapt_deploy.errors import UserError

# Rank 0 evaluates and saves while the others wait in their next collective; a dead process is
# noticed by torchrun, which stops the rest, so a long timeout costs nothing.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (torchrun's RANK, WORLD_SIZE and
    LOCAL_RANK; one process of one without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def primary(self) -> bool:
        """Rank 0: the process that alone writes checkpoints, logs and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, size): which shard of each global batch this process takes."""
        return self.rank, self.size


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """The World torchrun describes in `env`; one process when WORLD_SIZE is unset."""
    if "WORLD_SIZE" not in env:
        return World()
    try:
        size, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError(
            "environment variables RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun "
            f"sets them), got RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r}"
        ) from None
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"environment: RANK={rank} is not in 0..WORLD_SIZE-1 ({size - 1})")
    return World(rank, size, local_rank)


def pick_device(name: str, world: World) -> torch.device:
    """`train.device` for this process: `auto` is CUDA when available, else CPU; under torchrun
    `auto` and `cuda` mean this process's own GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and world.distributed:
        if device.index is not None:
            raise UserError(
                f"config key 'train.device' is {name!r}: with several processes use 'cuda' "
                "(each process takes cuda:LOCAL_RANK) or 'auto'"
            )
        return torch.device("cuda", world.local_rank)
    return device


def check_global_batch(batch_size: int, world: World) -> None:
    """The config's batch is the global batch: it must split evenly over the processes."""
    if batch_size % world.size:
        raise UserError(
            f"config key 'train.batch_size' is {batch_size}, which does not split over "
            f"{world.size} processes: use a multiple of {world.size} (it is the global batch)"
        )


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """The default process group while training (NCCL on GPUs, gloo on CPUs); nothing for one
    process."""
    if not world.distributed:
        yield
        return
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed: train with one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave together, so no process tears its gloo connections down while a peer still writes
    # its files (train() also frees its learner first: see there).
    dist.barrier()
    dist.destroy_process_group()


class _Discriminator(DistributedDataParallel):
    """A discriminator's gradients averaged over the processes in its own step; while frozen
    (the generator's adversarial loss passes through it) it runs as the plain module, so no
    gradient reduction is expected of parameters that get no gradient."""

    def forward(self, *args, **kwargs):
        if not any(p.requires_grad for p in self.module.parameters()):
            return self.module(*args, **kwargs)
        return super().forward(*args, **kwargs)


def wrap_segmenter(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the segmentation network (itself for one process).

    Frozen BatchNorm stays frozen (its parameters get no gradient and its statistics never
    change, so they are not broadcast); trained BatchNorm becomes SyncBatchNorm on GPUs. ASPP
    branches that are not summed (model.aspp_branches < 4) get no gradient, which DDP must be
    told of."""
    if not world.distributed:
        return model
    freeze_bn = getattr(model, "freeze_bn", True)
    if not freeze_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    unused = getattr(getattr(model, "head", None), "branches_summed", 4) < 4
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=ids, broadcast_buffers=not freeze_bn, find_unused_parameters=unused
    )


def wrap_discriminator(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """A discriminator whose own step averages its gradients over the processes."""
    if not world.distributed:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return _Discriminator(module, device_ids=ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (its state dict has no `module.`)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def average(values: dict[str, float], world: World, device: torch.device) -> dict[str, float]:
    """The mean of each value over the processes (the logged losses of the global batch)."""
    if not world.distributed or not values:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    return dict(zip(values, mean_over_processes(stacked, world).tolist(), strict=True))


def mean_over_processes(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of `value` over the processes, as a new tensor."""
    total = value.clone()
    dist.all_reduce(total)
    return total / world.size


def earlier_processes(values: list[int], world: World) -> list[int]:
    """The `values` of the processes of lower rank, in rank order (each its own list)."""
    gathered: list[list[int] | None] = [None] * world.size
    dist.all_gather_object(gathered, list(values))
    return [v for shard in gathered[: world.rank] for v in shard or []]


@contextmanager
def method_collectives(world: World) -> Iterator[None]:
    """While N processes train, the methods' losses and draws use these collectives so that
    the step is the one-process step on the whole batch (adapt/data_parallel.py)."""
    if not world.distributed:
        yield
        return
    active = data_parallel.Collectives(
        mean=lambda value: mean_over_processes(value, world),
        earlier=lambda values: earlier_processes(values, world),
        rank=world.rank,
        size=world.size,
    )
    with data_parallel.collectives(active):
        yield


def sum_over_processes(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """`tensor` summed over the processes, in place (e.g. a confusion matrix of a shard)."""
    if world.distributed:
        dist.all_reduce(tensor)
    return tensor


def barrier(world: World) -> None:
    """Every process waits here until all have arrived (rank 0 writing files the others read)."""
    if world.distributed:
        dist.barrier()


def torchrun_command(nproc: int, train_args: list[str]) -> list[str]:
    """The torchrun command that runs `adapt-deploy train train_args` in `nproc` processes on
    this machine (torchrun's --standalone rendezvous)."""
    if nproc < 1:
        raise UserError(f"--nproc must be 1 or more, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "adapt_deploy.cli",
        "train",
        *train_args,
    ]


def launch_training(nproc: int, config: Path, overrides: list[str], out: Path, resume: bool) -> int:
    """`adapt-deploy train --nproc N`: the same training in N local processes under torchrun;
    its exit status. Refused inside a torchrun process (which would launch N more each)."""
    if world_from_env().distributed:
        raise UserError("--nproc starts torchrun itself: drop it when running under torchrun")
    args = ["--config", str(config), "--out", str(out)]
    args += [arg for item in overrides for arg in ("--set", item)]
    return launch(nproc, args + (["--resume"] if resume else []))


def launch(nproc: int, train_args: list[str], cwd: Path | None = None) -> int:
    """Run training under torchrun in `nproc` local processes; torchrun's exit status.

    A SIGTERM to this launcher is passed on to torchrun, which passes it to its processes (rank 0
    saves the state). Ctrl-C in a terminal already reaches torchrun and its processes (one
    process group), so the launcher itself ignores SIGINT and waits for them to finish."""
    command = torchrun_command(nproc, train_args)
    print(f"launching: {shlex.join(command[2:])}", file=sys.stderr, flush=True)
    process = subprocess.Popen(command, cwd=cwd)
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, _: process.terminate()),
    }
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

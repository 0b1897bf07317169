"""Training time per method on N processes: `adapt-deploy train --nproc N` itself (torchrun,
DistributedDataParallel, each process its shard of the sampler), for each N asked.

    python -m bench.train_scaling [--nproc 1 2] [--methods wda_uda source_only]
                                  [--precision fp32] [--iters 30] [--warmup 5]
                                  [--preset tiny|paper] [--batch-per-process B]
                                  [--workers N] [--timeout S] [--results DIR]

Each (method, N) row is one real training run in bench/.work/train_scaling/<method>/n<N>: the
preset's shipped config (as bench/train_speed.py runs it: `tiny` on the CPU, `paper` on CUDA;
random initial weights, the same synthetic training set), with --warmup + --iters iterations,
a log line after every iteration and TensorBoard off. The global batch is N × the batch per
process (default: the config's batch), so every process does the same work at every N: the
rows show what adding processes buys (weak scaling), which is how the recipe scales
(docs/reproduce-gta5-cityscapes.md: the global batch grows with the GPUs, the lr and the
iteration counts follow it). Evaluation at the end runs on the 8 training target images and is
not timed.

Measured from the run's own metrics.jsonl: rank 0's wall time of each iteration after the
warm-up (data wait, forward, backward, gradient all-reduce, optimizer steps and the loss
average every iteration synchronizes on), as its median and 10th/90th percentiles; images/s of
the global batch at the median; the scaling efficiency, images/s at N over N × images/s at 1;
and the time the preset's schedule (its iterations × its batch, in images) takes at that rate.

CPU: gloo, and each process gets cores/N torch threads (OMP_NUM_THREADS), so the rows share
the same cores: on a CPU they show the engine's overhead, not a speed-up. CUDA: NCCL, one GPU
per process; an N above the GPUs visible is skipped with the reason.

Writes bench/results/train_scaling.md and train_scaling.json (--results DIR elsewhere); the
table is rewritten after each row, so a run stopped from outside keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapt_deploy.config import PRECISIONS, load_config
from adapt_deploy.engine.distributed import torchrun_command
from adapt_deploy.errors import UserError
from adapt_deploy.run_plot import METRICS
from bench.common import RESULTS, machine_info, run_rows_and_report, write_results
from bench.common import WORK as BENCH_WORK
from bench.train_speed import WORK as TRAIN_SPEED_WORK
from bench.train_speed import (
    add_run_flags,
    bench_data,
    check_run_flags,
    config_path,
    experiment_overrides,
    prepare_weak_labels,
)

NAME = "train_scaling"
WORK = BENCH_WORK / NAME
METHODS = ("wda_uda", "source_only")
NEVER = 10**9  # checkpoint_every: only the run's final save


@dataclass
class Settings:
    """What to measure (the command-line flags)."""

    methods: tuple[str, ...] = METHODS
    nproc: tuple[int, ...] = (1, 2)
    precision: str = "fp32"
    iters: int = 30
    warmup: int = 5
    preset: str | None = None  # None: paper on CUDA, tiny elsewhere
    batch_per_process: int | None = None  # None: the config's train.batch_size
    workers: int | None = None  # None: the config's data.num_workers
    timeout: float = 900.0  # seconds per run
    work: Path = WORK  # the runs
    data: Path = TRAIN_SPEED_WORK / "data"  # the synthetic training set (train_speed's)


@dataclass
class Row:
    """One (method, N) run; None where not measured."""

    method: str
    nproc: int
    batch: int  # the global batch
    status: str = "ok"  # ok | skipped: ... | failed: ...
    timed: int = 0
    ms_median: float | None = None
    ms_p10: float | None = None
    ms_p90: float | None = None
    images_s: float | None = None
    efficiency: float | None = None  # images/s over N x the one-process row's
    schedule_hours: float | None = None  # the preset's schedule at images_s
    threads: int | None = None  # torch threads per process (CPU)
    seconds: float = 0.0  # wall time of the run, start-up and final evaluation included

    @property
    def measured(self) -> bool:
        return self.ms_median is not None


@dataclass
class Report:
    preset: str
    device: str
    settings: Settings
    model: dict[str, str] = field(default_factory=dict)  # method → architecture and sizes
    schedule: dict[str, int] = field(default_factory=dict)  # method → images in its schedule
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = False


def iteration_times(metrics: Path, batch: int, warmup: int) -> list[float]:
    """Seconds of each logged iteration after the first `warmup`, from a run's metrics.jsonl
    written with train.log_every=1 (each line's images_per_second covers one iteration)."""
    times = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and record["iteration"] > warmup and record["images_per_second"] > 0:
            times.append(batch / record["images_per_second"])
    return times


def failure_line(log: str) -> str:
    """The line of a failed run's output that says why: the CLI's `error:` line or a process's
    abort, rather than torchrun's summary that follows them; else the last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    causes = [line for line in lines if line.startswith(("error:", "terminate called"))]
    return ((causes or lines or ["no output"])[-1])[:200]


def skip_reason(nproc: int, device: str, gpus: int) -> str | None:
    """Why N processes cannot run here, or None."""
    if nproc < 1:
        return "skipped: N must be 1 or more"
    if device == "cuda" and nproc > gpus:
        return f"skipped: {nproc} processes need {nproc} GPUs, {gpus} visible"
    return None


def run_overrides(
    settings: Settings, preset: str, method: str, nproc: int, device: str, data: tuple
) -> list[str]:
    """The `--set` overrides of one row's run (see the module docstring)."""
    overrides = experiment_overrides(settings.precision, device, data, settings.workers)
    base = load_config(config_path(preset, method), overrides)
    per_process = settings.batch_per_process or base.train.batch_size  # None: the config's
    _, target = data
    return [
        *overrides,
        f"data.val.root={target}",
        "data.val.split=train",
        f"train.batch_size={per_process * nproc}",
        f"train.iterations={settings.warmup + settings.iters}",
        "train.log_every=1",
        f"train.checkpoint_every={NEVER}",
        "train.eval_every=0",
        "train.tensorboard=false",
    ]


def measure(
    settings: Settings,
    preset: str,
    method: str,
    nproc: int,
    device: str,
    data: tuple,
    baseline: Row | None,
) -> Row:
    """Run one row's training and read its timing back."""
    overrides = run_overrides(settings, preset, method, nproc, device, data)
    config = load_config(config_path(preset, method), overrides)
    row = Row(method, nproc, config.train.batch_size)
    out = settings.work / method / f"n{nproc}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ)
    if config.train.device == "cpu":
        row.threads = max(1, (os.cpu_count() or 1) // nproc)
        env["OMP_NUM_THREADS"] = str(row.threads)
    args = ["--config", str(config_path(preset, method)), "--out", str(out)]
    args += [arg for item in overrides for arg in ("--set", item)]
    start = time.perf_counter()
    with (out / "train.log").open("w") as log:
        try:
            done = subprocess.run(
                torchrun_command(nproc, args), stdout=log, stderr=subprocess.STDOUT,
                env=env, timeout=settings.timeout, check=False,
            )  # fmt: skip
            failed = done.returncode != 0 and f"exit status {done.returncode}"
        except subprocess.TimeoutExpired:
            failed = f"over the {settings.timeout:.0f} s timeout"
    row.seconds = time.perf_counter() - start
    metrics = out / METRICS
    times = iteration_times(metrics, row.batch, settings.warmup) if metrics.is_file() else []
    if failed or not times:
        why = failure_line((out / "train.log").read_text(errors="replace"))
        row.status = f"failed: {failed or 'no timed iterations'}; {why}"
        return row
    ms = np.asarray(times) * 1000
    row.timed = len(times)
    row.ms_median = float(statistics.median(ms))
    row.ms_p10, row.ms_p90 = (float(v) for v in np.percentile(ms, [10, 90]))
    row.images_s = row.batch / (row.ms_median / 1000)
    if baseline is not None and baseline.measured:
        row.efficiency = row.images_s / (nproc * baseline.images_s / baseline.nproc)
    return row


def run(
    settings: Settings,
    log: Callable[[str], None] = print,
    after_row: Callable[[Report], None] = lambda report: None,
) -> Report:
    """Every (method, N) row, in order; `after_row` sees the report after each."""
    check_run_flags(settings.methods, settings.iters, settings.warmup)
    if settings.batch_per_process is not None and settings.batch_per_process < 1:
        raise UserError(f"--batch-per-process must be >= 1, got {settings.batch_per_process}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    preset = settings.preset or ("paper" if gpus else "tiny")
    device = "cuda" if preset == "paper" and gpus else "cpu"
    report = Report(preset, device, settings)
    data = bench_data(settings.data, log)
    start = time.perf_counter()
    for method in settings.methods:
        config = load_config(
            config_path(preset, method), experiment_overrides(settings.precision, device, data)
        )
        prepare_weak_labels(config)
        report.schedule[method] = config.train.iterations * config.train.batch_size
        m = config.model
        report.model[method] = f"{m.backbone} width {m.width}, target {config.data.target.size}"
        baseline = None
        for nproc in sorted(set(settings.nproc)):
            reason = skip_reason(nproc, device, gpus)
            if reason is not None:
                row = Row(method, nproc, 0, status=reason)
            else:
                log(f"{method}: {nproc} process(es), {settings.warmup + settings.iters} its")
                row = measure(settings, preset, method, nproc, device, data, baseline)
                if row.measured:
                    row.schedule_hours = report.schedule[method] / row.images_s / 3600
            baseline = baseline or (row if row.measured else None)
            report.rows.append(row)
            log(f"  {summary(row)}")
            report.seconds = time.perf_counter() - start
            after_row(report)
    report.complete = True
    return report


def summary(row: Row) -> str:
    if not row.measured:
        return f"N={row.nproc}: {row.status}"
    efficiency = f", efficiency {row.efficiency:.2f}" if row.efficiency is not None else ""
    return (
        f"N={row.nproc}, batch {row.batch}: {row.ms_median:.1f} ms/it (p10 {row.ms_p10:.1f}, "
        f"p90 {row.ms_p90:.1f}), {row.images_s:.1f} img/s{efficiency} [{row.seconds:.0f} s]"
    )


def _cell(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def render(report: Report) -> str:
    s = report.settings
    per_process = s.batch_per_process or "the config's batch"
    lines = [
        f"Preset `{report.preset}` on {report.device}, {s.precision}; "
        + "; ".join(f"{k}: {v}" for k, v in report.model.items())
        + f". Batch per process: {per_process}; {s.warmup} warm-up and {s.iters} timed "
        "iterations per run (each a real `adapt-deploy train --nproc N`); "
        + (
            f"the bench took {report.seconds:.0f} s."
            if report.complete
            else f"**partial**: written {report.seconds:.0f} s into a run that had not finished."
        ),
        "",
        "| method | N | global batch | ms/it median | p10 / p90 | img/s | efficiency | "
        "schedule (h) | threads per process | run s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        lines.append(
            f"| {r.method} | {r.nproc} | {r.batch or ''} | {_cell(r.ms_median)} | "
            f"{_cell(r.ms_p10)} / {_cell(r.ms_p90)} | {_cell(r.images_s)} | "
            f"{_cell(r.efficiency, 2)} | {_cell(r.schedule_hours, 2)} | {r.threads or ''} | "
            f"{r.seconds:.0f} | {r.status} |"
        )
    schedule = ", ".join(f"{k} {v} images" for k, v in report.schedule.items())
    lines += [
        "",
        "- ms/it: rank 0's wall time of one iteration after the warm-up, from the run's "
        "metrics.jsonl: data wait, forward, backward, gradient all-reduce, optimizer steps.",
        "- efficiency: img/s at N over N × img/s at the smallest N measured (1.00: every "
        "process as fast as one alone).",
        f"- schedule (h): the preset's schedule at this rate ({schedule}).",
    ]
    if report.device == "cpu":
        lines.append(
            "- CPU: the processes share the same cores (cores/N threads each), so these rows "
            "measure the engine's overhead, not a speed-up; GPU rows need a CUDA machine."
        )
    return "\n".join(lines) + "\n"


def write_report(report: Report, directory: Path = RESULTS) -> tuple[Path, Path]:
    markdown = write_results(NAME, "Training time on N processes", render(report), directory)
    settings: dict[str, Any] = asdict(report.settings)
    settings["work"], settings["data"] = str(settings["work"]), str(settings["data"])
    data = {
        "machine": machine_info(),
        "preset": report.preset,
        "device": report.device,
        "model": report.model,
        "schedule_images": report.schedule,
        "settings": settings,
        "seconds": report.seconds,
        "complete": report.complete,
        "rows": [asdict(r) for r in report.rows],
    }
    path = directory / f"{NAME}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return markdown, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods, in order")
    parser.add_argument(
        "--nproc", nargs="+", type=int, default=[1, 2], help="process counts (one GPU each)"
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="train.precision")
    add_run_flags(parser, "run")
    parser.add_argument(
        "--batch-per-process", type=int, default=None,
        help="batch of each process; the global batch is N times it (default: the config's)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers per dataset and process"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where train_scaling.md and .json go"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings(
        methods=tuple(args.methods),
        nproc=tuple(args.nproc),
        precision=args.precision,
        iters=args.iters,
        warmup=args.warmup,
        preset=args.preset,
        batch_per_process=args.batch_per_process,
        workers=args.workers,
        timeout=args.timeout,
    )
    return run_rows_and_report(run, settings, write_report, render, args.results)


if __name__ == "__main__":
    sys.exit(main())

"""Training speed: steady-state milliseconds per iteration, peak memory and whether the data
loader keeps up, per method, precision and pooling-kernel choice.

    python -m bench.train_speed [--methods wda_uda source_only adaptsegnet wda_point]
                                [--precisions fp32 bf16] [--kernels on off] [--iters 30]
                                [--warmup 5] [--preset tiny|paper] [--device auto] [--workers N]
                                [--loader-batches N] [--budget S] [--results DIR]

Presets. `paper` (the default on CUDA): configs/gta5_to_cityscapes/<method>.yaml as shipped
(DeepLab-v2 ResNet-101, batch 1, source 720x1280, target 512x1024, 4 loader workers per
dataset). `tiny` (the default elsewhere): configs/synthetic/<method>.yaml as shipped (ResNet-18
at width 16, batch 2, source 144x256, target 128x256, loading in the main process): the default
CPU run takes under a minute on 2 cores. Both train from random weights (the speed does not
depend on them) on a small synthetic set written once by `adapt-deploy synth`'s writer into
bench/.work/train_speed/data (8 source images at 288x512, 8 target images at 256x512; the
loaders resize them to the config sizes), with the image-level labels and points that
`wda_point` reads. The in-memory cache is off (data.cache=false): the loaders decode every time.

A row is one (method, precision, kernels) setting. The learner is built as `train` builds it
(train.precision is all the bench sets: autocast, the gradient scaler and channels_last are the
engine's), then --warmup iterations of `train_step`, then --iters timed ones, each timed alone:
the batches are fetched first, outside the timed region, and on CUDA torch.cuda.synchronize
brackets it. Reported: the median and the 10th/90th percentiles, the mean iteration including
the wait for data, images/s of the step and of the loaders alone (the same workers, timed before
the rows: a loader slower than the step starves the GPU and is flagged), the peak memory after
warm-up (CUDA: max_memory_allocated; CPU: this process's peak resident set, loader workers
not counted) and the dtype the first convolution produced ("ran as": it shows whether the
precision took effect).

Kernels: `on` runs the fused CUDA pooling kernels (ADAPT_DEPLOY_KERNELS=require), `off` the
PyTorch reference. Only the WDA methods call the pooling ops, so the others get one row
("unused"). On CPU there are no kernels: the `on` rows are skipped, and the notes say so.

Budget: --budget seconds from the start (default on CUDA 100, so the default GPU run fits
bench/gpu_check.sh's 120 s slot; none elsewhere); a row starts only when the previous row's time
still fits, and a running row stops its timed loop at the deadline once it has 3 iterations
(marked). The rows measured so far are written after each row, so a run killed from outside
still leaves them (marked partial).

Writes bench/results/train_speed.md (with the machine and GPU) and train_speed.json beside it
(--results DIR elsewhere). Goal, on a GPU with the paper preset: wda_uda at <= 40 ms per
iteration in bf16, i.e. >= 2.4x the fp32 step (about 96 ms on an H200, 2026-12-04, measured
by a rough method); the ratio is taken against this run's fp32 row.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import adapt_deploy
from adapt_deploy.adapt import METHOD_CLASSES
from adapt_deploy.adapt.wda import WeakLabelAdaptation
from adapt_deploy.config import PRECISIONS, ExperimentConfig, load_config
from adapt_deploy.data.synthetic.writer import SynthSpec, read_manifest, write_benchmark
from adapt_deploy.data.weak import points_path, stats_path, write_class_stats, write_points
from adapt_deploy.engine.method_data import labelled_dataset, target_dataset
from adapt_deploy.engine.precision import cudnn_benchmark
from adapt_deploy.engine.train import Learner, _batches, build_learner, pick_device, train_step
from adapt_deploy.errors import UserError
from adapt_deploy.models.checkpoints import initial_weights
from adapt_deploy.ops import kernels
from adapt_deploy.progress import Reporter
from bench.common import RESULTS, machine_info, run_rows_and_report, write_results
from bench.common import WORK as BENCH_WORK

NAME = "train_speed"
WORK = BENCH_WORK / NAME
CONFIGS = Path(adapt_deploy.__file__).parent / "configs"
# wda_uda first: the goal's rows are measured before a tight budget can cut anything.
METHODS = ("wda_uda", "source_only", "adaptsegnet", "wda_point")
DATA_SPEC = SynthSpec(seed=0, num_source=8, num_target_train=8, num_target_val=0, num_videos=0)
KERNEL_MODES = {"on": "require", "off": "off"}  # --kernels → ADAPT_DEPLOY_KERNELS
UNUSED = "unused"  # the kernels column of a method that never calls the pooling ops
MIN_TIMED = 3  # a row cut short by the budget keeps at least this many timed iterations
PREFETCH_FACTOR = 2  # DataLoader's default batches queued per worker
GOAL_METHOD, GOAL_MS, GOAL_SPEEDUP = "wda_uda", 40.0, 2.4
GPU_BUDGET_S = 100.0  # the default budget on CUDA: bench/gpu_check.sh gives the bench 120 s


# Preset → the directory of adapt_deploy/configs/ whose <method>.yaml it runs.
PRESETS = {"paper": "gta5_to_cityscapes", "tiny": "synthetic"}


@dataclass
class Settings:
    """What to measure (the command-line flags)."""

    methods: tuple[str, ...] = METHODS
    precisions: tuple[str, ...] = ("fp32", "bf16")
    kernels: tuple[str, ...] = ("on", "off")
    iters: int = 30
    warmup: int = 5
    preset: str | None = None  # None: paper on CUDA, tiny elsewhere
    device: str = "auto"
    workers: int | None = None  # None: the preset config's data.num_workers
    loader_batches: int | None = None  # None: --iters
    budget: float | None = None  # seconds from the start; None: 100 on CUDA, else no limit
    work: Path = WORK  # where the synthetic data is kept


@dataclass
class Row:
    """One (method, precision, kernels) setting and what it measured; None where not measured."""

    method: str
    precision: str
    kernels: str  # on | off | unused
    status: str = "ok"  # ok | cut short by the budget | skipped: ... | failed: ...
    timed: int = 0
    ms_median: float | None = None
    ms_p10: float | None = None
    ms_p90: float | None = None
    loop_ms: float | None = None  # mean iteration including the wait for its batches
    images_per_iteration: int = 0
    step_images_s: float | None = None
    loader_images_s: float | None = None
    loader_bound: bool | None = None  # the loaders alone deliver fewer images/s than the step
    peak_mb: float | None = None
    ran_as: str = ""  # dtype of the first convolution's output during the timed iterations
    kernel_status: str = ""
    seconds: float = 0.0  # wall time of the row, learner build included

    @property
    def measured(self) -> bool:
        return self.ms_median is not None


@dataclass
class Report:
    """A run's rows and what they were measured on."""

    preset: str
    device: str
    model: dict[str, str]  # method → architecture, batch and sizes
    workers: int
    settings: Settings
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    memory: str = ""
    seconds: float = 0.0
    planned: int = 0  # rows in the plan
    complete: bool = False  # False while rows are still being measured

    @property
    def goal(self) -> dict[str, Any] | None:
        """wda_uda bf16 against 40 ms and against this run's fp32 row (same kernels); None off
        a GPU, off the paper preset, or without both rows."""
        if not (self.device.startswith("cuda") and self.preset == "paper"):
            return None
        done = {(r.precision, r.kernels): r for r in self.rows if r.method == GOAL_METHOD}
        for mode in ("on", "off"):
            bf16, fp32 = done.get(("bf16", mode)), done.get(("fp32", mode))
            if bf16 and fp32 and bf16.measured and fp32.measured:
                speedup = fp32.ms_median / bf16.ms_median
                return {
                    "kernels": mode,
                    "bf16_ms": bf16.ms_median,
                    "fp32_ms": fp32.ms_median,
                    "speedup": speedup,
                    "met_ms": bf16.ms_median <= GOAL_MS,
                    "met_speedup": speedup >= GOAL_SPEEDUP,
                }
        return None


# --------------------------------------------------------------------------------------------
# Data and configs
# --------------------------------------------------------------------------------------------


def bench_data(directory: Path, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(source root, target root) of the synthetic set, written once under `directory`."""
    if read_manifest(directory) is None:
        log(f"writing the synthetic training set to {directory}")
    try:
        write_benchmark(directory, DATA_SPEC)
    except FileExistsError:  # written by another renderer version or spec: this is our cache
        write_benchmark(directory, DATA_SPEC, force=True)
    return directory / "source", directory / "target"


def config_path(preset: str, method: str) -> Path:
    """The shipped config a preset runs for `method`."""
    return CONFIGS / PRESETS[preset] / f"{method}.yaml"


def experiment_overrides(
    precision: str,
    device: torch.device | str,
    data: tuple[Path, Path],
    workers: int | None = None,
) -> list[str]:
    """The `--set` overrides that point a preset's config at the bench data at `precision`."""
    source, target = data
    overrides = [
        f"data.source.root={source}",
        "data.source.split=train",
        f"data.target.root={target}",
        "data.target.split=train",
        "data.cache=false",
        f"train.device={device}",
        f"train.precision={precision}",
        "model.init=null",  # random weights: the speed does not depend on them
    ]
    if workers is not None:
        overrides.append(f"data.num_workers={workers}")
    return overrides


def experiment_config(
    preset: str,
    method: str,
    precision: str,
    device: torch.device,
    data: tuple[Path, Path],
    workers: int | None = None,
) -> ExperimentConfig:
    """The preset's config of `method` on the bench data at `precision` (validated)."""
    overrides = experiment_overrides(precision, device, data, workers)
    return load_config(config_path(preset, method), overrides)


def describe(config: ExperimentConfig) -> str:
    """Architecture, batch and sizes of a config, for the report."""
    m, d = config.model, config.data
    return (
        f"DeepLab-v2 {m.backbone} width {m.width}, batch {config.train.batch_size}, "
        f"source {d.source.size[0]}x{d.source.size[1]}, target {d.target.size[0]}x"
        f"{d.target.size[1]}"
    )


def prepare_weak_labels(config: ExperimentConfig) -> None:
    """The target's class statistics and points, when the method reads them (what `adapt-deploy
    data stats` and `data points` write); the source's statistics are made by the loader."""
    needs = METHOD_CLASSES[config.train.method].target_needs
    if needs not in ("image_labels", "points"):
        return
    entry = config.data.target
    if not stats_path(entry.root, entry.split).is_file():
        write_class_stats(entry.root, entry.kind, entry.split, config.model.num_classes)
    seed = config.adapt.point_seed
    if needs == "points" and not points_path(entry.root, entry.split, seed).is_file():
        write_points(entry.root, entry.kind, entry.split, seed, config.model.num_classes)


def uses_pooling_ops(method: str) -> bool:
    """Whether the method's losses call lse_pool / attention_pool (the WDA family, adapt/wda.py):
    for the others the kernel choice changes nothing."""
    return issubclass(METHOD_CLASSES[method], WeakLabelAdaptation)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory from `reset()` on, in MiB: CUDA's max_memory_allocated on a GPU; on the CPU
    this process's peak resident set (VmHWM, reset through /proc/self/clear_refs), or, where
    that cannot be reset, the resident set at the end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "RSS at the end (peak RSS cannot be reset here)"

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        key = "VmHWM" if self.kind == "peak RSS" else "VmRSS"
        try:
            match = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        except OSError:
            return None
        return int(match.group(1)) / 1024 if match else None


def loader_rate(
    sources: Iterator, targets: Iterator | None, batches: int, workers: int, images: int
) -> float:
    """Images/s the loaders deliver with nothing else running (`images` per iteration: a source
    batch and, where the method has one, a target batch). The first fetches are not timed:
    the workers' start-up and the batches they queue meanwhile."""

    def fetch() -> None:
        next(sources)
        if targets is not None:
            next(targets)

    for _ in range(1 + workers * PREFETCH_FACTOR):
        fetch()
    start = time.perf_counter()
    for _ in range(batches):
        fetch()
    return batches * images / (time.perf_counter() - start)


def dtype_name(dtype: torch.dtype | None) -> str:
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(dtype, str(dtype).removeprefix("torch.")) if dtype is not None else "?"


def time_steps(
    learner: Learner,
    config: ExperimentConfig,
    sources: Iterator,
    targets: Iterator | None,
    settings: Settings,
    device: torch.device,
    deadline: float | None,
) -> tuple[list[float], float, float | None, str, str]:
    """Warm-up, then the timed iterations: (seconds of each, mean seconds per iteration with
    the data wait, peak memory MiB, memory kind, dtype the first convolution produced)."""
    model = learner.model.train()
    seen: list[torch.dtype] = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    iteration = 0

    def step() -> float:
        nonlocal iteration
        source = next(sources)
        target = next(targets) if targets is not None else None
        synchronize(device)
        start = time.perf_counter()
        train_step(learner, source, target, config, iteration)
        synchronize(device)
        iteration += 1
        return time.perf_counter() - start

    def late() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    memory = PeakMemory(device)
    try:
        with cudnn_benchmark(device):  # as `train` runs its loop
            for _ in range(settings.warmup):
                step()
                if late():
                    break
            memory.reset()
            seen.clear()
            times: list[float] = []
            start = time.perf_counter()
            for _ in range(settings.iters):
                times.append(step())
                if late() and len(times) >= MIN_TIMED:
                    break
            loop = (time.perf_counter() - start) / len(times)
    finally:
        hook.remove()
    return times, loop, memory.peak_mb(), memory.kind, dtype_name(seen[-1] if seen else None)


def set_kernel_mode(mode: str) -> None:
    """ADAPT_DEPLOY_KERNELS for the next row (`unused` rows run the reference)."""
    os.environ[kernels.MODE_ENV] = KERNEL_MODES.get(mode, "off")
    kernels.reset()


def fill(row: Row, times: list[float], loop: float, loader: float) -> None:
    """The row's statistics from its timed iterations (seconds)."""
    ms = np.asarray(times) * 1000
    row.timed = len(times)
    row.ms_median = float(statistics.median(ms))
    row.ms_p10, row.ms_p90 = (float(v) for v in np.percentile(ms, [10, 90]))
    row.loop_ms = loop * 1000
    row.step_images_s = row.images_per_iteration / (row.ms_median / 1000)
    row.loader_images_s = loader
    row.loader_bound = loader < row.step_images_s


def plan(settings: Settings, device: torch.device) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The (method, precision, kernels) rows to run, in order, and notes on what is left out."""
    modes = [m for m in settings.kernels if device.type == "cuda" or m != "on"]
    notes = []
    if device.type != "cuda" and "on" in settings.kernels:
        notes.append(
            "No fused kernels on the CPU (they are CUDA-only; the pooling ops run the PyTorch "
            "reference): the kernels-on rows are skipped."
        )
    rows = []
    for method in settings.methods:
        for precision in settings.precisions:
            kinds = modes if uses_pooling_ops(method) else [UNUSED]
            rows += [(method, precision, mode) for mode in kinds]
    return rows, notes


def measure_method(
    method: str,
    todo: list[tuple[str, str]],
    report: Report,
    data: tuple[Path, Path],
    device: torch.device,
    deadline: float | None,
    log: Callable[[str], None],
    after_row: Callable[[Report], None],
) -> None:
    """The rows of one method: its loaders once (shared by its rows), a learner per precision."""
    settings, total = report.settings, report.planned
    skipped = f"skipped: the {settings.budget:.0f} s budget is spent"

    def over_budget() -> bool:  # would the next row (as long as the last one) end too late?
        last = next((r.seconds for r in reversed(report.rows) if r.seconds), 0.0)
        return deadline is not None and time.perf_counter() + last > deadline

    if over_budget():
        for precision, mode in todo:
            report.rows.append(Row(method, precision, mode, status=skipped))
        log(f"{method}: {skipped}")
        return
    base = experiment_config(report.preset, method, "fp32", device, data, settings.workers)
    report.model[method] = describe(base)
    report.workers = base.data.num_workers
    prepare_weak_labels(base)
    labelled = labelled_dataset(base, METHOD_CLASSES[method], Reporter())
    target = target_dataset(base, METHOD_CLASSES[method])
    batch, seed, workers = base.train.batch_size, base.train.seed, base.data.num_workers
    sources = _batches(labelled, batch, seed, 0, workers)
    targets = _batches(target, batch, seed + 1, 0, workers) if target is not None else None
    images = batch * (1 if targets is None else 2)
    log(f"{method}: timing the data loaders ({workers} workers each)")
    loader = loader_rate(
        sources, targets, settings.loader_batches or settings.iters, workers, images
    )
    learners: dict[str, tuple[Learner, ExperimentConfig]] = {}
    for precision, mode in todo:
        row = Row(method, precision, mode, images_per_iteration=images, loader_images_s=loader)
        label = f"[{len(report.rows) + 1}/{total}] {method} {precision} kernels {mode}"
        if over_budget():
            row.status = skipped
            report.rows.append(row)
            log(f"{label}: {row.status}")
            continue
        report.rows.append(row)
        start = time.perf_counter()
        try:
            set_kernel_mode(mode)
            if device.type == "cuda":
                row.kernel_status = kernels.kernel_status().describe()  # require: load or raise
            if precision not in learners:  # kernel rows of one precision share a learner
                learners.clear()  # one learner in memory at a time
                release(device)
                config = experiment_config(
                    report.preset, method, precision, device, data, settings.workers
                )
                torch.manual_seed(config.train.seed)
                init = initial_weights(config.model)
                learners[precision] = (build_learner(config, device, init), config)
            times, loop, row.peak_mb, report.memory, row.ran_as = time_steps(
                *learners[precision], sources, targets, settings, device, deadline
            )  # no local reference: clearing `learners` frees the learner
            fill(row, times, loop, loader)
            if len(times) < settings.iters:
                row.status = f"cut short by the budget after {len(times)} iterations"
        except (UserError, RuntimeError) as exc:  # a kernel build, an OOM, a bad precision
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            row.status = f"failed: {first[:300]}"
        row.seconds = time.perf_counter() - start
        log(f"{label}: {summary(row)}")
        after_row(report)
    learners.clear()
    release(device)


def release(device: torch.device) -> None:
    """Free a dropped learner's memory before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summary(row: Row) -> str:
    """One progress line."""
    if not row.measured:
        return row.status
    starved = " (loader slower than the step)" if row.loader_bound else ""
    peak = f", peak {row.peak_mb:.0f} MiB" if row.peak_mb is not None else ""
    return (
        f"{row.ms_median:.1f} ms/it (p10 {row.ms_p10:.1f}, p90 {row.ms_p90:.1f}), ran as "
        f"{row.ran_as}; step {row.step_images_s:.1f} img/s, loader {row.loader_images_s:.1f} "
        f"img/s{starved}{peak} [{row.seconds:.1f} s]"
        + ("" if row.status == "ok" else f" - {row.status}")
    )


def run(
    settings: Settings,
    log: Callable[[str], None] = print,
    after_row: Callable[[Report], None] = lambda report: None,
) -> Report:
    """Measure every planned row (see the module docstring); `after_row` sees the report after
    each measured row (main writes the results then, so a run killed by an outer timeout still
    leaves the rows it measured)."""
    check_run_flags(settings.methods, settings.iters, settings.warmup)
    device = pick_device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {settings.device}: torch sees no CUDA device here")
    preset = settings.preset or ("paper" if device.type == "cuda" else "tiny")
    if settings.budget is None:  # the report records the resolved budget
        settings = replace(settings, budget=GPU_BUDGET_S if device.type == "cuda" else 0.0)
    start = time.perf_counter()
    deadline = start + settings.budget if settings.budget > 0 else None
    rows, notes = plan(settings, device)
    report = Report(preset, str(device), {}, 0, settings, notes=notes, planned=len(rows))
    data = bench_data(settings.work / "data", log)
    saved = os.environ.get(kernels.MODE_ENV)

    def checkpoint(partial: Report) -> None:
        partial.seconds = time.perf_counter() - start
        after_row(partial)

    try:
        for method in settings.methods:
            todo = [(p, k) for m, p, k in rows if m == method]
            measure_method(method, todo, report, data, device, deadline, log, checkpoint)
    finally:
        if saved is None:
            os.environ.pop(kernels.MODE_ENV, None)
        else:
            os.environ[kernels.MODE_ENV] = saved
        kernels.reset()
    report.seconds = time.perf_counter() - start
    report.complete = True
    return report


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    """A table cell: `digits` decimals, two significant digits below 1 (a CPU paper step)."""
    if value is None:
        return ""
    return f"{value:.{digits}f}" if abs(value) >= 1 or value == 0 else f"{value:.2g}"


def goal_line(report: Report) -> str:
    """The goal's verdict, or why this run does not judge it."""
    goal = report.goal
    target = (
        f"Goal: {GOAL_METHOD} <= {GOAL_MS:.0f} ms per iteration in bf16 (>= {GOAL_SPEEDUP}x "
        "the fp32 step, about 96 ms on an H200 on 2026-12-04)"
    )
    if goal is None:
        why = (
            "it is judged on a CUDA GPU with the paper preset"
            if not (report.device.startswith("cuda") and report.preset == "paper")
            else f"this run has no measured {GOAL_METHOD} fp32 and bf16 rows with the same kernels"
        )
        return f"{target}: not judged here ({why})."
    verdict = {True: "met", False: "NOT met"}
    return (
        f"{target}: bf16 {goal['bf16_ms']:.1f} ms with kernels {goal['kernels']} - "
        f"{verdict[goal['met_ms']]}; this run's fp32 {goal['fp32_ms']:.1f} ms, speed-up "
        f"{goal['speedup']:.2f}x - {verdict[goal['met_speedup']]}."
    )


def render(report: Report) -> str:
    """The Markdown body of bench/results/train_speed.md."""
    s = report.settings
    by_model: dict[str, list[str]] = {}
    for method, model in report.model.items():
        by_model.setdefault(model, []).append(method)
    models = "; ".join(
        model if len(by_model) == 1 else f"{', '.join(methods)}: {model}"
        for model, methods in by_model.items()
    )
    lines = [
        f"Preset `{report.preset}` on {report.device}: {models}. Random initial weights; data: "
        f"{DATA_SPEC.num_source} source and {DATA_SPEC.num_target_train} target synthetic images "
        f"({DATA_SPEC.source_size[0]}x{DATA_SPEC.source_size[1]}, "
        f"{DATA_SPEC.target_size[0]}x{DATA_SPEC.target_size[1]}) resized by the loaders to the "
        f"config sizes, no in-memory cache, {report.workers} loader workers per dataset. "
        f"{s.warmup} warm-up and {s.iters} timed iterations per row; "
        + (
            f"the run took {report.seconds:.0f} s."
            if report.complete
            else f"**partial**: written {report.seconds:.0f} s into a run that had not finished."
        ),
        "",
        "| method | precision | kernels | ms/it median | p10 / p90 | ms/it with data wait "
        "| step img/s | loader img/s | loader | peak MiB | ran as | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        loader = "" if r.loader_bound is None else ("**slower**" if r.loader_bound else "ok")
        ran = r.ran_as if r.ran_as in ("", r.precision) else f"**{r.ran_as}**"
        lines.append(
            f"| {r.method} | {r.precision} | {r.kernels} | {_num(r.ms_median)} | "
            f"{_num(r.ms_p10)} / {_num(r.ms_p90)} | {_num(r.loop_ms)} | "
            f"{_num(r.step_images_s)} | {_num(r.loader_images_s)} | {loader} | "
            f"{_num(r.peak_mb, 0)} | {ran} | {r.status} |"
        )
    lines += [
        "",
        goal_line(report),
        "",
        "- ms/it: one `train_step` (forward, backward, optimizer steps of the model and the "
        "discriminators), batches already fetched"
        + (", torch.cuda.synchronize around it" if report.device.startswith("cuda") else "")
        + "; with data wait: the mean iteration including fetching its batches.",
        "- loader img/s: the DataLoaders alone, same workers, before the rows; **slower** "
        "marks a loader that cannot keep up with the step (the GPU would wait for data).",
        f"- peak MiB: {report.memory or 'not measured'}, from the end of the warm-up.",
        "- ran as: the dtype the first convolution produced in the timed iterations "
        "(**bold** where it is not the row's precision: the engine did not apply it).",
        "- kernels: on = ADAPT_DEPLOY_KERNELS=require (fused CUDA pooling kernels), off = the "
        "PyTorch reference; unused: the method calls no pooling op (one row).",
    ]
    statuses = sorted({r.kernel_status for r in report.rows if r.kernel_status})
    lines += [f"- kernel status seen: {status}" for status in statuses]
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def write_report(report: Report, directory: Path = RESULTS) -> tuple[Path, Path]:
    """<directory>/train_speed.md (machine and GPU included) and train_speed.json."""
    body = render(report)
    markdown = write_results(
        NAME, "Training speed: ms per iteration, memory, loader", body, directory
    )
    settings = asdict(report.settings)
    settings["work"] = str(settings["work"])
    data = {
        "machine": machine_info(),
        "preset": report.preset,
        "device": report.device,
        "model": report.model,
        "workers": report.workers,
        "memory": report.memory,
        "seconds": report.seconds,
        "complete": report.complete,
        "settings": settings,
        "rows": [asdict(r) for r in report.rows],
        "goal": report.goal,
        "goal_line": goal_line(report),
        "notes": report.notes,
    }
    path = directory / f"{NAME}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return markdown, path


def check_run_flags(methods: tuple[str, ...], iters: int, warmup: int) -> None:
    """UserError for an unknown method or an iteration count below its minimum."""
    for method in methods:
        if method not in METHOD_CLASSES:
            raise UserError(f"--methods: unknown method {method!r}; one of {list(METHOD_CLASSES)}")
    if iters < 1 or warmup < 0:
        raise UserError("--iters must be >= 1 and --warmup >= 0")


def add_run_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """--iters, --warmup and --preset, which this bench and bench.train_scaling share (`what`:
    what the iterations belong to)."""
    parser.add_argument("--iters", type=int, default=30, help=f"timed iterations per {what}")
    parser.add_argument(
        "--warmup", type=int, default=5, help=f"untimed iterations per {what} first"
    )
    parser.add_argument(
        "--preset", choices=list(PRESETS), default=None,
        help="paper (default on CUDA): the GTA5->Cityscapes configs; tiny (default on CPU)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), help="methods, run in this order"
    )
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], choices=PRECISIONS,
        help="train.precision of the rows",
    )  # fmt: skip
    parser.add_argument(
        "--kernels", nargs="+", default=["on", "off"], choices=list(KERNEL_MODES),
        help="fused CUDA pooling kernels on (require) and/or off (reference); CUDA only",
    )  # fmt: skip
    add_run_flags(parser, "row")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--workers", type=int, default=None,
        help="DataLoader workers per dataset (default: the preset config's data.num_workers)",
    )  # fmt: skip
    parser.add_argument(
        "--loader-batches", type=int, default=None,
        help="batches timed for the loader rate (default: --iters)",
    )  # fmt: skip
    parser.add_argument(
        "--budget", type=float, default=None,
        help=f"seconds for the whole run (default {GPU_BUDGET_S:.0f} on CUDA, else none; 0: "
        "none); rows that no longer fit are skipped",
    )  # fmt: skip
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where train_speed.md and .json go"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings(
        methods=tuple(args.methods),
        precisions=tuple(args.precisions),
        kernels=tuple(args.kernels),
        iters=args.iters,
        warmup=args.warmup,
        preset=args.preset,
        device=args.device,
        workers=args.workers,
        loader_batches=args.loader_batches,
        budget=args.budget,
    )
    return run_rows_and_report(run, settings, write_report, render, args.results)


if __name__ == "__main__":
    sys.exit(main())

"""Setting up adaptation for a stream: the bundle's package, the adapter, its saved state, the
runtime sync and the background worker; and saving the state at the end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from adapt_deploy.bundle.meta import load_meta
from adapt_deploy.errors import UserError
from adapt_deploy.progress import Reporter
from adapt_deploy.tta.options import AdaptOptions, ResetPolicy, parse_home, parse_threshold
from adapt_deploy.tta.settings import parse_settings, set_fields
from adapt_deploy.tta.shift import ShiftDetector
from adapt_deploy.tta.worker import AdaptWorker


@dataclass
class AdaptSetup:
    """`adapt-deploy stream --adapt` settings: the options and where the state lives."""

    options: AdaptOptions
    state: Path | None = None  # --adapt-state: resumed when it exists, written at the end
    wait: bool = False  # --adapt-wait: every due frame's update runs before the next frame


# the `stream` flags of AdaptOptions fields: {flag: field}
DEDICATED_FLAGS = {
    "--adapt-every": "every",
    "--adapt-params": "params",
    "--lr": "lr",
    "--threshold": "threshold",
    "--reset-policy": "reset",
    "--adapt-budget": "budget",
    "--adapt-bank": "bank_size",
    "--adapt-home": "home_distance",
    "--adapt-source-stages": "source_stages",
}


# the dedicated flags whose text is parsed (the others arrive typed from the CLI)
FLAG_PARSERS: dict[str, Callable[[str], Any]] = {
    "--threshold": parse_threshold,
    "--reset-policy": ResetPolicy.parse,
    "--adapt-home": parse_home,
}


def setup_from_flags(
    adapt: bool,
    every: int | None = None,
    params: str | None = None,
    lr: float | None = None,
    threshold: str | None = None,
    reset_policy: str | None = None,
    state: Path | None = None,
    budget: float | None = None,
    bank: int | None = None,
    home: str | None = None,
    source_stages: int | None = None,
    settings: list[str] | None = None,
    wait: bool = False,
) -> AdaptSetup | None:
    """The `stream` flags as an AdaptSetup (None without --adapt): the dedicated flags, then
    `settings` (--adapt-set FIELD=VALUE) for the fields without one. Adaptation flags given
    without --adapt, a dedicated flag's field in `settings`, and a budget with --adapt-wait
    (which has none) are errors rather than silently ignored or set two ways."""
    dedicated_values = (every, params, lr, threshold, reset_policy, budget, bank, home,
                        source_stages)  # fmt: skip
    values = dict(zip(DEDICATED_FLAGS, dedicated_values, strict=True))
    given = {**values, "--adapt-state": state, "--adapt-set": settings or None,
             "--adapt-wait": wait or None}  # fmt: skip
    if not adapt:
        used = [flag for flag, value in given.items() if value is not None]
        if used:
            raise UserError(f"{', '.join(used)} only apply with --adapt")
        return None
    if wait and budget is not None:
        raise UserError(
            "--adapt-budget does not apply with --adapt-wait: the stream waits for every due "
            "frame's update instead of skipping frames over a budget"
        )
    chosen = {
        DEDICATED_FLAGS[flag]: FLAG_PARSERS[flag](value) if flag in FLAG_PARSERS else value
        for flag, value in values.items()
        if value is not None
    }
    options = replace(AdaptOptions(), **chosen)
    flag_of = dict(zip(DEDICATED_FLAGS.values(), DEDICATED_FLAGS, strict=True))
    dedicated = [f"{name}: use {flag_of[name]}" for name in set_fields(settings or [])
                 if name in flag_of]  # fmt: skip
    if dedicated:
        raise UserError(f"--adapt-set is for the fields without a flag ({'; '.join(dedicated)})")
    return AdaptSetup(parse_settings(settings or [], options.check()), state, wait)


def check_state_path(path: Path | None) -> None:
    """Fail before streaming when the state file cannot be written where it is asked."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--adapt-state {path}: is a directory, expected a file name")
    if not path.parent.is_dir():
        raise UserError(f"--adapt-state {path}: the directory {path.parent} does not exist")


def adapter_device(segmenter_device: str) -> str:
    """Where the adapter trains: on the segmenter's GPU when torch can reach it (whatever the
    backend: TensorRT and ONNX Runtime CUDA included), else on the CPU."""
    import torch

    if segmenter_device.startswith("cuda") and torch.cuda.is_available():
        return segmenter_device
    return "cpu"


def teacher_precision(segmenter_precision: str, device: str) -> str:
    """The precision the adapter's teacher runs at: the runtime's, where torch computes it on
    the adapter's `device` (fp16 and bf16 on a GPU, bf16 on the CPU), else fp32. The teacher is
    what the runtime serves, so its pseudo-labels come from the outputs the runtime gives, and
    on a GPU its forward takes the fast path (an fp16 forward instead of an fp32 one)."""
    from adapt_deploy.runtime.torch_inference import PRECISIONS

    kind = "cuda" if device.startswith("cuda") else "cpu"
    return segmenter_precision if segmenter_precision in PRECISIONS[kind] else "fp32"


def open_adaptation(
    bundle: Path, segmenter: Any, setup: AdaptSetup, reporter: Reporter | None = None
) -> AdaptWorker:
    """The worker adapting `segmenter`'s model (not started). UserError, with the re-export
    command, when the bundle lacks what adaptation needs."""
    from adapt_deploy.export.adaptation_package import load_package
    from adapt_deploy.models.checkpoints import load_checkpoint
    from adapt_deploy.tta.adapter import OnlineAdapter
    from adapt_deploy.tta.state import resume
    from adapt_deploy.tta.sync import make_sync

    reporter = reporter or Reporter()
    setup.options.check()
    check_state_path(setup.state)
    meta = load_meta(Path(bundle))
    package = load_package(Path(bundle), meta)
    model, config = load_checkpoint(package.checkpoint)
    device = adapter_device(segmenter.device)
    model = model.to(device)
    size = setup.options.size or tuple(meta["evaluation"]["size"])
    options = setup.options
    if segmenter.backend == "torch":  # torch's thread pool is per process: leave inference's
        options = replace(options, threads=None)
    adapter = OnlineAdapter(
        model,
        config.input,
        package.stats,
        options,
        size=(int(size[0]), int(size[1])),
        lse_k=package.lse_k,
        checkpoint_sha256=meta["checkpoint"]["sha256"],
        teacher_precision=teacher_precision(segmenter.precision, device),
    )
    if adapter.teacher_precision != "fp32":
        reporter.log(f"adaptation: the teacher runs at {adapter.teacher_precision}, as the runtime")
    if adapter.student_precision != "fp32":
        reporter.log(f"adaptation: the student trains under {adapter.student_precision} autocast")
    for note in adapter.notes:
        reporter.log(f"adaptation: {note}")
    if resume(adapter, setup.state):
        reporter.log(
            f"resumed adaptation from {setup.state} ({adapter.counters.updates} updates so far)"
        )
    sync = make_sync(segmenter, model, config.input)
    if adapter.counters.updates:  # the runtime starts from the bundle's weights: catch it up
        result = sync.push(adapter.teacher)
        if not result.ok:
            sync.close()
            raise UserError(
                f"--adapt-state {setup.state}: the runtime rejected the saved weights "
                f"({result.reason}); delete the file to start from the bundle's weights"
            )
    return AdaptWorker(adapter, sync, ShiftDetector(), inline=setup.wait, state=setup.state)


def finish_adaptation(worker: AdaptWorker, setup: AdaptSetup, frames: int) -> list[str]:
    """Stop the worker (`stream` already has: this does not wait again) and save the state, only
    when frames were segmented and no update is still running; summary lines."""
    from adapt_deploy.tta.state import save_state

    summary = worker.close()
    lines = summary.lines()
    if setup.state is None or frames == 0:
        return lines
    if summary.still_running:  # saving now could catch the adapter half-way through an update
        kept = "keeps its previous contents" if Path(setup.state).exists() else "was not written"
        lines.append(
            f"adaptation state not saved: an update was still running; {setup.state} {kept}"
        )
    else:
        save_state(worker.adapter, setup.state)
        lines.append(f"adaptation state: {setup.state}")
    return lines

"""Shared by the benchmarks: machine description, the results file, a random-weight bundle."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / ".work"
# The input normalization of the shipped configs (ImageNet mean and std, RGB, 0-255 units).
RGB_INPUT = {"color_order": "RGB", "mean": [123.7, 116.3, 103.5], "std": [58.4, 57.1, 57.4]}


def machine_info() -> dict[str, str]:
    """What the numbers were measured on."""
    import torch

    from adapt_deploy.demo_reference import this_cpu_model

    cpu = this_cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu} ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})",
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run_rows_and_report(
    run: Callable[..., Any],
    settings: Any,
    write_report: Callable[[Any, Path], tuple[Path, Path]],
    render: Callable[[Any], str],
    results: Path,
) -> int:
    """A row-by-row bench's main after parsing: `run(settings, log=, after_row=)` with progress
    lines and the results rewritten after each row (a run stopped from outside keeps them),
    then the table. Exit status: 2 on a user error, 1 when a row failed, else 0."""
    from adapt_deploy.errors import UserError

    try:
        report = run(
            settings,
            log=lambda line: print(line, flush=True),
            after_row=lambda partial: write_report(partial, results),
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    markdown, data = write_report(report, results)
    print(render(report))
    print(f"wrote {markdown} and {data}")
    return 1 if any(r.status.startswith("failed") for r in report.rows) else 0


def write_results(name: str, title: str, body: str, directory: Path = RESULTS) -> Path:
    """<directory>/<name>.md (bench/results/ by default; tests pass their own): a title, the
    machine, then the benchmark's own Markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    machine = "\n".join(f"- {k}: {v}" for k, v in machine_info().items())
    path = directory / f"{name}.md"
    path.write_text(f"# {title}\n\n{machine}\n\n{body.rstrip()}\n")
    return path


def random_bundle(
    width: int = 16,
    size: tuple[int, int] = (256, 512),
    source: Path | None = None,
    backbone: str = "resnet18",
) -> Path:
    """A randomly initialised DeepLab-v2 (`backbone`, ResNet-18 by default) at `width` (seed 0)
    exported with `size` = (H, W) as its evaluation size, written once under
    bench/.work/bundles/ and reused: for
    benchmarks of speed and memory, which do not depend on the weights. With `source` (a
    labelled GTA5-layout directory) the bundle also gets the adaptation package that
    `stream --adapt` needs (source statistics over its images), and the model is first made
    numerically like a trained one on those images (`calibrate_batchnorm`): what the adapter
    does depends on the values."""
    import torch

    from adapt_deploy.config import from_dict
    from adapt_deploy.export.pipeline import export_bundle
    from adapt_deploy.models.checkpoints import build_model, checkpoint_meta, save_checkpoint

    short = "r18" if backbone == "resnet18" else backbone.replace("resnet", "r")
    # "_adaptbn": calibrated BN statistics (bundles named "_adapt" before 2026-12-07 were not)
    name = f"{short}w{width}_{size[0]}x{size[1]}" + ("_adaptbn" if source is not None else "")
    bundle = WORK / "bundles" / name
    if (bundle / "meta.json").is_file():
        return bundle
    torch.manual_seed(0)
    config = from_dict(
        {
            "name": f"bench_random_{name}",
            "input": RGB_INPUT,
            "model": {"backbone": backbone, "width": width, "num_classes": 19},
            "data": {
                "val": {"kind": "cityscapes", "root": ".", "split": "val", "size": list(size)},
                **(
                    {"source": {"kind": "gta5", "root": str(source), "size": list(size)}}
                    if source is not None
                    else {}
                ),
            },
        }
    )
    checkpoint = WORK / "bundles" / f"{name}.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(config.model)
    if source is not None:
        calibrate_batchnorm(model, source, size, config.input)
    save_checkpoint(checkpoint, model, checkpoint_meta(config, 0))
    return export_bundle(checkpoint, bundle, force=True, source_data=source).bundle


RESIDUAL_SCALE = 0.3  # the last BN affine of each residual branch of a random model


def calibrate_batchnorm(
    model: Any,
    source: Path,
    size: tuple[int, int],
    spec: Any,
    residual_scale: float = RESIDUAL_SCALE,
) -> None:
    """Make a randomly initialised `model` numerically like a trained one: every BN's running
    statistics set to their mean over the GTA5-layout `source` images (at most 8, resized to
    `size`), then each residual branch's last BN affine scaled by `residual_scale`.

    Left as initialised (statistics mean 0, variance 1), a random ResNet-101's logits are far
    beyond fp16's range: on a GPU the adapter's fp16 teacher and every push check would fail (a
    collapse reset or a rejected push at every update), and bench.tta_cost would time a path no
    trained model takes. Calibrated alone it is chaotic: too few of its fp16 labels agree with
    fp32 for the push check's 99.5%. `python -m bench.random_model` measures the three
    (bench/results/random_model.md)."""
    import cv2
    import torch

    from adapt_deploy.data.normalize import normalize
    from adapt_deploy.models.resnet import BasicBlock, Bottleneck

    images = sorted((source / "images").glob("*.png"))[:8]
    if not images:
        raise FileNotFoundError(f"{source / 'images'}: no PNG image to calibrate BN statistics on")
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in batchnorms]
    model.eval()
    for bn in batchnorms:  # BN alone in train mode (DeepLab's train() keeps frozen BN in eval)
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: every image weighs the same
        bn.train()
    with torch.no_grad():
        for path in images:
            rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
            model(normalize(torch.from_numpy(rgb).permute(2, 0, 1)[None], spec))
    for bn, momentum in zip(batchnorms, momenta, strict=True):
        bn.momentum = momentum
    model.eval()
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, Bottleneck | BasicBlock):
                last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
                last.weight.mul_(residual_scale)
                last.bias.mul_(residual_scale)

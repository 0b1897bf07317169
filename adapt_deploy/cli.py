"""The `adapt-deploy` command line: parses arguments, calls library functions, prints results."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from adapt_deploy import __version__
from adapt_deploy.errors import UserError

app = typer.Typer(
    help="Domain-adaptive semantic segmentation: train, evaluate, export, stream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()


def _reporter():
    from adapt_deploy.progress import RichReporter

    return RichReporter()


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the data, runs and results.")] = Path(
        "adapt-deploy-demo"
    ),
    fresh: Annotated[
        bool, typer.Option(help="Regenerate data and retrain even if completed runs exist.")
    ] = False,
) -> None:
    """End-to-end run on the synthetic benchmark: synthesize, train, evaluate on target."""
    from adapt_deploy.demo import run_demo

    result = run_demo(out, _reporter(), fresh=fresh)
    header, rows = result.table()
    _print_table("IoU (%) on the synthetic target val split", header, rows)
    for method, seconds in result.seconds.items():
        console.print(f"{method}: trained in {seconds:.0f} s")
    console.print(f"results: {result.out / 'results.md'}")


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output directory (source/, target/, videos/).")],
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")] = 0,
    num_source: Annotated[int, typer.Option(help="Source images (GTA5 layout).")] = 600,
    num_target_train: Annotated[int, typer.Option(help="Target train images (Cityscapes).")] = 400,
    num_target_val: Annotated[int, typer.Option(help="Target val images (Cityscapes).")] = 150,
    num_videos: Annotated[int, typer.Option(help="Dashcam videos with per-frame labels.")] = 1,
    video_frames: Annotated[int, typer.Option(help="Frames per video.")] = 300,
    force: Annotated[bool, typer.Option(help="Overwrite a different benchmark in OUT.")] = False,
) -> None:
    """Write the synthetic domain-shift benchmark: GTA5-layout source, Cityscapes-layout target."""
    from adapt_deploy.data.synthetic_writer import SynthSpec, write_benchmark
    from adapt_deploy.progress import StageProgress

    spec = SynthSpec(
        seed=seed,
        num_source=num_source,
        num_target_train=num_target_train,
        num_target_val=num_target_val,
        num_videos=num_videos,
        video_frames=video_frames,
    )
    try:
        with StageProgress(_reporter()) as progress:
            write_benchmark(out, spec, progress=progress, force=force)
    except FileExistsError as exc:
        raise UserError(f"{exc} (pass --force to overwrite)") from None
    console.print(f"wrote the synthetic benchmark to {out}")


@app.command(name="train")
def train_cmd(
    config: Annotated[Path, typer.Option(help="YAML experiment config.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set optim.lr=1e-3 (repeatable)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default: runs/<config name>).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in OUT from its last state.")
    ] = False,
) -> None:
    """Train a model from a config; checkpoints are written atomically and runs can be resumed."""
    from adapt_deploy.config import load_config
    from adapt_deploy.engine.train import train

    cfg = load_config(config, set_ or [])
    run_dir = out or Path("runs") / cfg.name
    result = train(cfg, run_dir, resume=resume, reporter=_reporter())
    console.print(f"checkpoint: {result.checkpoint} ({result.iterations} iterations)")
    if result.evaluation is not None:
        console.print(
            f"mIoU on {cfg.data.val.root} ({cfg.data.val.split}): "
            f"{100 * result.evaluation.miou:.2f}"
        )


@app.command(name="evaluate")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint.pt written by train.")],
    data: Annotated[Path, typer.Option(help="Dataset root (Cityscapes, GTA5 or SYNTHIA layout).")],
    split: Annotated[str, typer.Option(help="Split to evaluate (Cityscapes layout).")] = "val",
    kind: Annotated[str, typer.Option(help="Layout: cityscapes, gta5 or synthia.")] = "cityscapes",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write results here.")
    ] = None,
) -> None:
    """mIoU of a checkpoint on a labelled split: one confusion matrix, IoU per class."""
    from adapt_deploy.engine.evaluate import evaluate_checkpoint, format_iou_table

    result = evaluate_checkpoint(checkpoint, data, split, kind, reporter=_reporter())
    rows = format_iou_table({"model": result})
    _print_table(f"IoU (%) of {checkpoint} on {data} ({split})", ["class", "IoU"], rows)
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


data_app = typer.Typer(help="Weak labels of a dataset: class statistics and point labels.")
app.add_typer(data_app, name="data")


@data_app.command("stats")
def data_stats(
    root: Annotated[Path, typer.Argument(help="Dataset root.")],
    kind: Annotated[str, typer.Option(help="Layout: cityscapes, gta5 or synthia.")] = "cityscapes",
    split: Annotated[str, typer.Option(help="Split (Cityscapes layout).")] = "train",
) -> None:
    """Per-image class pixel counts, the source of image-level labels (stored beside the data)."""
    from adapt_deploy.data.labels import CLASS_NAMES
    from adapt_deploy.data.weak import image_labels, presence_thresholds, write_class_stats
    from adapt_deploy.progress import StageProgress

    with StageProgress(_reporter()) as stage:
        progress = partial(stage, "counting class pixels")
        path, stats = write_class_stats(root, kind, split, progress=progress)
    present = image_labels(stats.counts)
    thresholds = presence_thresholds(stats.counts)
    rows = [
        [name, f"{int((stats.counts[:, c] > 0).sum())}", f"{int(present[:, c].sum())}",
         f"{thresholds[c]:.0f}"]
        for c, name in enumerate(CLASS_NAMES)
    ]  # fmt: skip
    header = ["class", "images with pixels", "images labelled present", "pixel threshold"]
    _print_table(f"{len(stats.names)} images of {root} ({split})", header, rows)
    console.print(f"wrote {path}")


@data_app.command("points")
def data_points(
    root: Annotated[Path, typer.Argument(help="Dataset root.")],
    kind: Annotated[str, typer.Option(help="Layout: cityscapes, gta5 or synthia.")] = "cityscapes",
    split: Annotated[str, typer.Option(help="Split (Cityscapes layout).")] = "train",
    seed: Annotated[int, typer.Option(help="Which random annotation; fixed per seed.")] = 0,
) -> None:
    """Draw one labelled pixel per present class and image (stored beside the data)."""
    from adapt_deploy.data.weak import write_points
    from adapt_deploy.progress import StageProgress

    with StageProgress(_reporter()) as stage:
        path, count = write_points(
            root, kind, split, seed, progress=partial(stage, "drawing points")
        )
    console.print(f"wrote {count} points to {path}")


@app.command()
def doctor() -> None:
    """What is installed and which backends work."""
    from adapt_deploy.doctor import run_checks

    checks = run_checks()
    table = Table(title=f"adapt-deploy {__version__}")
    for name in ("component", "found", "note"):
        table.add_column(name)
    for c in checks:
        found = c.found if c.ok else f"[red]{c.found}[/red]"
        table.add_row(c.name, found, c.advice)
    console.print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def main() -> None:
    """Entry point: user mistakes are printed as one clear line, never a traceback."""
    try:
        app()
    except UserError as exc:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)
    except OSError as exc:  # unwritable output, full disk: the file and the reason, no traceback
        Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

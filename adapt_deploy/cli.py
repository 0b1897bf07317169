"""The `adapt-deploy` command line: parses arguments, calls library functions, prints results."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapt_deploy import __version__
from adapt_deploy.config import INIT_FORMATS
from adapt_deploy.errors import UserError
from adapt_deploy.extras import missing_extra
from adapt_deploy.registry import BACKEND_CHOICES, BUNDLE_BACKENDS, DATASET_LAYOUTS
from adapt_deploy.tta.options import AdaptOptions

KIND_HELP = f"Layout: {DATASET_LAYOUTS.help()}."  # the registered dataset layouts
ADAPT = AdaptOptions()  # the adapter defaults the `stream --adapt` help shows
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


def _print_plain(line: str) -> None:
    """A line as it is: paths and lists may hold [brackets], which are not markup."""
    console.print(line, markup=False)


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
    seed: Annotated[
        int,
        typer.Option(help="Training seed and draw of the target's points (the README: 0, 1, 2)."),
    ] = 0,
) -> None:
    """End-to-end run on the synthetic benchmark: synthesize, train, evaluate on target."""
    from adapt_deploy.demo import run_demo

    result = run_demo(out, _reporter(), fresh=fresh, seed=seed)
    header, rows = result.table()
    _print_table(f"IoU (%) on the synthetic target val split, seed {seed}", header, rows)
    _print_plain(f"stage times: {result.stage_line()}")
    for line in result.against_reference():
        _print_plain(line)
    console.print(f"results: {result.out / 'results.md'}")
    if result.stream is not None:
        console.print(
            f"overlay video: {result.stream.outputs['overlay']} ({result.stream.frames} frames, "
            f"{result.stream.fps:.1f} frames/s)"
        )


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output directory (source/, target/, videos/).")],
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")] = 0,
    num_source: Annotated[int, typer.Option(help="Source images (GTA5 layout).")] = 600,
    num_target_train: Annotated[int, typer.Option(help="Target train images (Cityscapes).")] = 400,
    num_target_val: Annotated[int, typer.Option(help="Target val images (Cityscapes).")] = 150,
    num_videos: Annotated[int, typer.Option(help="Dashcam videos with per-frame labels.")] = 1,
    video_frames: Annotated[int, typer.Option(help="Frames per video.")] = 300,
    sources: Annotated[
        str,
        typer.Option(
            help="Labelled sources, comma-separated: gta5 (source/) and optionally synthia "
            "(synthia/, SYNTHIA-RAND-CITYSCAPES layout, 16 classes) for multi-source training."
        ),
    ] = "gta5",
    force: Annotated[bool, typer.Option(help="Overwrite a different benchmark in OUT.")] = False,
) -> None:
    """Write the synthetic domain-shift benchmark: GTA5-layout source, Cityscapes-layout target."""
    from adapt_deploy.data.synthetic.writer import SynthSpec, parse_sources, write_benchmark
    from adapt_deploy.progress import StageProgress

    spec = SynthSpec(
        sources=parse_sources(sources),
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
    nproc: Annotated[
        int | None,
        typer.Option(
            help="Train in N processes on this machine (one per GPU; gloo on CPU) under "
            "torchrun. train.batch_size stays the global batch."
        ),
    ] = None,
) -> None:
    """Train a model from a config; checkpoints are written atomically and runs can be resumed."""
    from adapt_deploy.config import load_config
    from adapt_deploy.engine.distributed import launch_training
    from adapt_deploy.engine.train import train
    from adapt_deploy.signals import SignalInterrupt

    cfg = load_config(config, set_ or [])
    run_dir = out or Path("runs") / cfg.name
    if nproc is not None:
        raise typer.Exit(launch_training(nproc, config, set_ or [], run_dir, resume))
    try:
        result = train(cfg, run_dir, resume=resume, reporter=_reporter())
    except SignalInterrupt as exc:  # the state is saved: exit as the signal's convention says
        raise typer.Exit(128 + exc.signum) from None
    if not result.primary:  # rank 0 reports for every process
        return
    console.print(f"checkpoint: {result.checkpoint} ({result.iterations} iterations)")
    if result.evaluation is not None:
        console.print(
            f"mIoU on {cfg.data.val.root} ({cfg.data.val.split}): "
            f"{100 * result.evaluation.miou:.2f}"
        )


@app.command(name="evaluate")
def evaluate_cmd(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint.pt written by train, or a bundle directory.")
    ],
    data: Annotated[Path, typer.Option(help="Dataset root (Cityscapes, GTA5 or SYNTHIA layout).")],
    split: Annotated[str, typer.Option(help="Split to evaluate (Cityscapes layout).")] = "val",
    kind: Annotated[str, typer.Option(help=KIND_HELP)] = "cityscapes",
    backend: Annotated[
        str,
        typer.Option(
            help="auto (torch for a checkpoint, onnxruntime for a bundle), torch, "
            f"{', '.join(BUNDLE_BACKENDS)}."
        ),
    ] = "auto",
    precision: Annotated[str, typer.Option(help="Bundle model: fp32 or fp16.")] = "fp32",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write results here.")
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="Read CHECKPOINT as released weights of this architecture preset, e.g. "
            "deeplab_v2_r101 (ADVENT) or adaptsegnet_r101 (AdaptSegNet, WDA); docs/weights.md."
        ),
    ] = None,
    init_format: Annotated[
        str, typer.Option(help=f"With --arch: {', '.join(INIT_FORMATS)}.")
    ] = "auto",
) -> None:
    """mIoU of a checkpoint or an exported bundle on a labelled split, IoU per class."""
    from adapt_deploy.engine.evaluate import format_iou_table
    from adapt_deploy.export.evaluate_bundle import evaluate_path

    result, what = evaluate_path(
        checkpoint,
        data,
        split,
        kind,
        backend,
        precision,
        reporter=_reporter(),
        arch=arch,
        init_format=init_format,
    )
    rows = format_iou_table({"model": result})
    _print_table(f"IoU (%) of {what} on {data} ({split})", ["class", "IoU"], rows)
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


@app.command(name="convert-weights")
def convert_weights_cmd(
    src: Annotated[
        Path, typer.Argument(help="Weights: a checkpoint, DeepLab-v2 or torchvision ResNet file.")
    ],
    out: Annotated[Path, typer.Argument(help="The checkpoint.pt to write.")],
    arch: Annotated[
        str, typer.Option(help="Architecture preset, e.g. adaptsegnet_r101 (docs/weights.md).")
    ] = "deeplab_v2_r101",
    init_format: Annotated[str, typer.Option(help=f"{', '.join(INIT_FORMATS)}.")] = "auto",
    strict: Annotated[
        bool, typer.Option(help="Refuse weights that do not match; --no-strict loads what does.")
    ] = True,
) -> None:
    """Write released weights as a checkpoint of this project (for model.init, export, evaluate)."""
    from adapt_deploy.models.checkpoints import convert_weights
    from adapt_deploy.models.weight_formats import arch_preset

    convert_weights(src, out, arch_preset(arch), init_format, strict, log=_print_plain)
    console.print(f"wrote {out}")


@app.command(name="pseudo-label")
def pseudo_label_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint.pt that labels the split.")],
    data: Annotated[Path, typer.Option(help="Root of the unlabelled target dataset.")],
    out: Annotated[Path, typer.Option(help="Directory for the labels (Cityscapes layout).")],
    portion: Annotated[
        float, typer.Option(help="Share of each class's predicted pixels to keep, in (0, 1].")
    ] = 0.2,
    kind: Annotated[str, typer.Option(help=KIND_HELP)] = "cityscapes",
    split: Annotated[str, typer.Option(help="Split to label.")] = "train",
) -> None:
    """Class-balanced pseudo-labels (CBST): per class, the most confident `portion` of its pixels.

    Writes OUT/gtFine/SPLIT/CITY/*_gtFine_labelIds.png and OUT/summary.json (per-class counts
    and thresholds, written last). Run it again to resume after an interruption.
    """
    from adapt_deploy.adapt.pseudo_labelling import pseudo_label_checkpoint

    summary = pseudo_label_checkpoint(checkpoint, data, out, portion, kind, split, _reporter())
    rows = [
        [name, f"{c['predicted_pixels']}", f"{c['labelled_pixels']}",
         "-" if c["threshold"] is None else f"{c['threshold']:.3f}"]
        for name, c in summary["classes"].items()
    ]  # fmt: skip
    header = ["class", "predicted pixels", "labelled pixels", "threshold"]
    _print_table(f"{summary['images']} images of {data} ({split})", header, rows)
    console.print(f"labelled {summary['labelled_share']:.1%} of the pixels; wrote {out}")


@app.command()
def rank(
    checkpoint: Annotated[Path, typer.Argument(help="The inter-domain adapted checkpoint.pt.")],
    data: Annotated[Path, typer.Option(help="Root of the unlabelled target dataset.")],
    out: Annotated[Path, typer.Option(help="Directory for rank.json and the easy labels.")],
    easy_share: Annotated[
        float, typer.Option("--lambda", help="Share of the images in the easy split, in (0, 1).")
    ] = 0.67,
    kind: Annotated[str, typer.Option(help=KIND_HELP)] = "cityscapes",
    split: Annotated[str, typer.Option(help="Split to rank.")] = "train",
) -> None:
    """IntraDA's entropy ranking: split the target into easy and hard images, label the easy.

    Writes OUT/pseudo_labels/ (the easy split's labels) and OUT/rank.json. Then train
    method intrada with `--set selftrain.rank=OUT/rank.json --set model.init=CHECKPOINT`.
    """
    from adapt_deploy.adapt.ranking import RANK_FILE, rank_target

    record = rank_target(checkpoint, data, out, easy_share, kind, split, _reporter())
    easy, hard = len(record["easy"]), len(record["hard"])
    console.print(f"easy split: {easy} images, hard split: {hard}; wrote {out / RANK_FILE}")


@app.command(name="suggest-points")
def suggest_points_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint.pt that picks the pixels.")],
    data: Annotated[Path, typer.Option(help="Root of the target dataset to annotate.")],
    out: Annotated[Path, typer.Option(help="The round directory to write.")],
    strategy: Annotated[
        str,
        typer.Option(
            help="ppl (LabOR's representative uncertain points), spl (LabOR's whole "
            "inconsistency mask), random or entropy (baselines). ppl and spl need a checkpoint "
            "of a labor_* method (it holds the second classifier)."
        ),
    ] = "ppl",
    budget: Annotated[
        int | None,
        typer.Option(help="Pixels per image (default: 40; spl: the whole mask, capped by this)."),
    ] = None,
    kind: Annotated[str, typer.Option(help=KIND_HELP)] = "cityscapes",
    split: Annotated[str, typer.Option(help="Split to annotate.")] = "train",
    simulate: Annotated[
        bool, typer.Option(help="Answer from the split's ground truth (benchmarks).")
    ] = False,
    exclude: Annotated[
        str | None, typer.Option(help="A point set whose pixels are labelled already.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random choices.")] = 0,
) -> None:
    """Pick the target pixels to ask an annotator for (LabOR), with an overlay per image.

    Writes OUT/round.json, OUT/suggestions/NAME.json ({"image", "size": [h, w], "pixels":
    [[x, y], ...], "predicted": [trainId, ...]}), OUT/overlays/NAME.png and OUT/summary.json
    (the budget used); with --simulate also OUT/answers.csv. The annotator answers in
    OUT/answers.csv (image,x,y,class); then `adapt-deploy data import-points OUT/answers.csv`.
    Run it again to resume after an interruption.
    """
    from adapt_deploy.adapt.suggestion import suggest_checkpoint

    summary = suggest_checkpoint(
        checkpoint, data, out, strategy, budget, kind, split, simulate, exclude, seed,
        _reporter(),
    )  # fmt: skip
    console.print(
        f"{summary['images']} images, {summary['pixels']} pixels to label "
        f"({summary['pixels_per_image']:.1f} per image, {summary['share_of_pixels']:.2%} of "
        f"their pixels); wrote {out}"
    )
    answers = out / "answers.csv"
    if simulate:
        console.print(f"simulated answers in {answers}")
    else:
        console.print(f"answer in {answers} (header image,x,y,class), then import it")


@app.command()
def plot(
    run: Annotated[Path, typer.Argument(help="A run directory (holding metrics.jsonl).")],
    out: Annotated[
        Path | None, typer.Option(help="The image to write (default: RUN/curves.png).")
    ] = None,
) -> None:
    """Draw a run's loss and mIoU curves as a PNG (no TensorBoard needed)."""
    from adapt_deploy.run_plot import plot_run

    console.print(f"wrote {plot_run(run, out)}")


data_app = typer.Typer(help="Weak labels of a dataset: class statistics and point labels.")
app.add_typer(data_app, name="data")


@data_app.command("stats")
def data_stats(
    root: Annotated[Path, typer.Argument(help="Dataset root.")],
    kind: Annotated[str, typer.Option(help=KIND_HELP)] = "cityscapes",
    split: Annotated[str, typer.Option(help="Split (Cityscapes layout).")] = "train",
) -> None:
    """Per-image class pixel counts, the source of image-level labels (stored beside the data)."""
    from adapt_deploy.data.weak import image_labels, presence_thresholds, write_class_stats
    from adapt_deploy.labels import CLASS_NAMES
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
    kind: Annotated[str, typer.Option(help=KIND_HELP)] = "cityscapes",
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


@data_app.command("import-points")
def data_import_points(
    answers: Annotated[Path, typer.Argument(help="ROUND_DIR/answers.csv of a labelling round.")],
    name: Annotated[
        str | None, typer.Option(help="Name of the point set (default: the round's folder).")
    ] = None,
    previous: Annotated[
        str | None, typer.Option(help="A point set of earlier rounds to carry into this one.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a point set of the same name.")] = False,
) -> None:
    """Check an annotator's answers and store them where wda_point and labor_* read them.

    Every bad line (unknown image, pixel outside the image, unknown class, a pixel answered
    twice) is named with its line number. Train on the set with `--set adapt.points=NAME`.
    """
    from adapt_deploy.data.annotation import import_points

    path, counts = import_points(answers, name, previous, force)
    console.print(
        f"stored {counts['labelled']} labelled pixels ({counts['void']} void) of "
        f"{counts['images']} images, {counts['total']} in the set; wrote {path}"
    )
    set_name = path.stem.split("_points_", 1)[1]
    console.print(f"train on them with --set adapt.points={set_name}")


@app.command(name="export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint.pt written by train.")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write.")],
    fp16: Annotated[
        bool, typer.Option(help="Also write model_fp16.onnx (mixed precision).")
    ] = False,
    logits: Annotated[bool, typer.Option(help="Also output the 1/8-resolution logits.")] = False,
    layout: Annotated[
        str,
        typer.Option(
            help="NHWC: RGB uint8 frames, normalized in the graph; NCHW: float32 "
            "input normalized outside (NVIDIA's ROS pipelines)."
        ),
    ] = "NHWC",
    min_shape: Annotated[str | None, typer.Option(help="Smallest N,H,W (engine profile).")] = None,
    opt_shape: Annotated[str | None, typer.Option(help="Optimal N,H,W (engine profile).")] = None,
    max_shape: Annotated[str | None, typer.Option(help="Largest N,H,W (engine profile).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 20,
    force: Annotated[bool, typer.Option(help="Replace an existing bundle at OUT.")] = False,
    engine: Annotated[
        bool,
        typer.Option(
            help="Then build this machine's TensorRT engine on GPU 0 (needs TensorRT; another "
            "GPU: build-engine --device N)."
        ),
    ] = False,
    refit: Annotated[
        bool, typer.Option(help="Build a refittable engine (implies --engine).")
    ] = False,
    source_data: Annotated[
        Path | None,
        typer.Option(
            help="Labelled source data (a root of the checkpoint's data.source kind) for the "
            "adaptation package that `stream --adapt` needs (default: the checkpoint config's "
            "data.source.root, when it exists)."
        ),
    ] = None,
    adapt_images: Annotated[
        int, typer.Option(help="Source images the adaptation package's statistics use.")
    ] = 200,
    adapt_package: Annotated[
        bool,
        typer.Option(
            help="Add the adaptation package (the checkpoint's weights and source statistics) "
            "that `stream --adapt` needs; --no-adapt-package keeps the training weights out "
            "of the bundle."
        ),
    ] = True,
) -> None:
    """Export a checkpoint to a deployment bundle: ONNX, parity-checked, with samples."""
    from adapt_deploy.export.pipeline import build_engines_after_export, export_bundle, parse_shape

    options = {"min": min_shape, "opt": opt_shape, "max": max_shape}
    shapes = {k: parse_shape(v, f"--{k}-shape") for k, v in options.items() if v is not None}
    reporter = _reporter()
    result = export_bundle(
        checkpoint,
        out,
        fp16,
        logits,
        layout,
        shapes,
        opset,
        force,
        reporter=reporter,
        source_data=source_data,
        adapt_images=adapt_images,
        adapt_package=adapt_package,
    )
    summary = result.meta["parity"]["summary"]
    for precision, row in summary.items():
        console.print(
            f"parity {precision}: label agreement >= {100 * row['min_label_agreement']:.3f}%, "
            f"presence max |diff| {row['max_presence_diff']:.1e}"
        )
    console.print(f"bundle: {result.bundle}")
    if engine or refit:
        for path in build_engines_after_export(result.bundle, fp16, refit, reporter):
            console.print(f"engine: {path}")


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="A bundle directory written by export.")],
    backend: Annotated[str, typer.Option(help=f"{', '.join(BUNDLE_BACKENDS)}.")] = "onnxruntime",
    precision: Annotated[
        list[str] | None, typer.Option(help="fp32 and/or fp16 (default: every model).")
    ] = None,
    device: Annotated[
        int,
        typer.Option(
            min=0, help="CUDA device index of the GPU backends (tensorrt, onnxruntime-cuda)."
        ),
    ] = 0,
) -> None:
    """Re-check a bundle on this machine: file hashes, then its samples against references."""
    from adapt_deploy.export.verify import verify_bundle

    reports = verify_bundle(bundle, backend, precision, device)
    for report in reports:
        header = ["sample", "shape", "label agreement", "presence max |diff|", "result"]
        rows = [
            [s.file, "x".join(map(str, s.shape)),
             f"{100 * s.metrics.get('label_agreement', float('nan')):.3f}%",
             f"{s.metrics.get('presence_max_abs_diff', float('nan')):.1e}",
             "ok" if not s.problems else "; ".join(s.problems)]
            for s in report.samples
        ]  # fmt: skip
        _print_table(f"{bundle}: {report.backend} {report.precision}", header, rows)
    if not all(r.passed for r in reports):
        raise typer.Exit(1)
    console.print(f"{bundle}: verified on {backend}")


@app.command(name="build-engine")
def build_engine_cmd(
    bundle: Annotated[Path, typer.Argument(help="A bundle written by adapt-deploy export.")],
    fp16: Annotated[
        bool, typer.Option("--fp16/--no-fp16", help="Build the fp16 engine (else fp32).")
    ] = False,
    refit: Annotated[
        bool, typer.Option(help="Refittable engine: on-device adaptation updates its weights.")
    ] = False,
    timing_cache: Annotated[
        Path | None,
        typer.Option(help="Timing cache file (default: one per TensorRT and GPU in engines/)."),
    ] = None,
    workspace_gb: Annotated[
        float | None, typer.Option(help="Builder workspace limit in GiB (default: TensorRT's).")
    ] = None,
    device: Annotated[
        int,
        typer.Option(
            min=0,
            help="CUDA device index to build on, as CUDA numbers them (after "
            "CUDA_VISIBLE_DEVICES): the engine is for that GPU's model.",
        ),
    ] = 0,
) -> None:
    """Build this GPU's TensorRT engine from the bundle's ONNX (on the target; no torch needed)."""
    from adapt_deploy.export.tensorrt import build_engines

    paths = build_engines(
        bundle,
        fp16=fp16,
        refit=refit,
        reporter=_reporter(),
        timing_cache=timing_cache,
        workspace_gb=workspace_gb,
        device=device,
    )
    for path in paths:
        console.print(f"engine: {path}")


@app.command()
def stream(
    source: Annotated[
        str,
        typer.Argument(
            help="Video file, camera index (0), rtsp:// or http(s):// URL, image folder or glob."
        ),
    ],
    bundle: Annotated[Path, typer.Option(help="A bundle directory written by export.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Overlay video (.mp4, .mkv, .avi), the source's fps and size."),
    ] = None,
    labels_dir: Annotated[
        Path | None, typer.Option(help="Per-frame trainId PNGs, DIR/{index:06d}.png.")
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option(help="JSONL, a line per frame: index, timestamp, latency, presence."),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help=f"{', '.join(BACKEND_CHOICES)} (onnxruntime: CUDA with onnxruntime-gpu)."
        ),
    ] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto, fp32, fp16 or bf16 (bf16: the torch backend only).")
    ] = "auto",
    cuda_graph: Annotated[
        bool | None,
        typer.Option(
            "--cuda-graph/--no-cuda-graph",
            help="Replay CUDA graphs (default: on for the torch backend on CUDA, off for ONNX "
            "Runtime's CUDA provider; ADAPT_DEPLOY_CUDA_GRAPHS=0 turns them off).",
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="GPU index (0, 1, ...; the CPU when no GPU backend is usable), cuda:N (that GPU "
            "or an error) or cpu."
        ),
    ] = "0",
    max_frames: Annotated[int | None, typer.Option(help="Stop after this many frames.")] = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Replace outputs that already exist (an output is never allowed onto an input)."
        ),
    ] = False,
    show: Annotated[bool, typer.Option(help="Show the overlay in a window (q quits).")] = False,
    alpha: Annotated[float, typer.Option(help="Overlay opacity of the class colours.")] = 0.5,
    fps: Annotated[
        float | None,
        typer.Option(help="Frame rate of an image folder (default 10), or of a video without one."),
    ] = None,
    reconnect_timeout: Annotated[
        float, typer.Option(help="Seconds a dropped live source is retried before giving up.")
    ] = 30.0,
    adapt: Annotated[
        bool,
        typer.Option(
            help="Keep adapting the model on the frames (background worker, pseudo-weak labels); "
            "needs a bundle exported with --source-data."
        ),
    ] = False,
    adapt_every: Annotated[
        int | None,
        typer.Option(
            help=f"Adapt on every K-th frame and on detected shifts. (default {ADAPT.every})"
        ),
    ] = None,
    adapt_params: Annotated[
        str | None,
        typer.Option(help=f"What learns: bn (BN affine), bn+head or all. (default {ADAPT.params})"),
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help=f"The adapter's SGD learning rate. (default {ADAPT.lr:g})")
    ] = None,
    threshold: Annotated[
        str | None,
        typer.Option(
            help="Pseudo-weak label threshold: 'auto' (per class, calibrated on the source at "
            "export) or a presence value in (0, 1) for every class. (default auto)"
        ),
    ] = None,
    reset_policy: Annotated[
        str | None,
        typer.Option(
            help="When to return to the bundle's weights: collapse, periodic:N (updates), "
            f"collapse+periodic:N, or none. (default {ADAPT.reset})"
        ),
    ] = None,
    adapt_state: Annotated[
        Path | None,
        typer.Option(
            help="Adapter state file: resumed when it exists, written every minute and at the end."
        ),
    ] = None,
    adapt_budget: Annotated[
        float | None,
        typer.Option(
            help="Share of wall time the adapter may be busy; frames beyond it are skipped "
            f"(counted). (default {ADAPT.budget:g})"
        ),
    ] = None,
    adapt_bank: Annotated[
        int | None,
        typer.Option(
            help="Adapted states kept, one per detected condition (weather, lighting); the least "
            f"recently used gives way. 0: one state for everything. (default {ADAPT.bank_size})"
        ),
    ] = None,
    adapt_home: Annotated[
        str | None,
        typer.Option(
            help="Frames whose signature lies this close to the source images' are home: the "
            "bundle's own weights serve them, nothing is learned. 'auto': the radius calibrated "
            "at export; 0: no frame is home. (default auto)"
        ),
    ] = None,
    adapt_source_stages: Annotated[
        int | None,
        typer.Option(
            help="The backbone's last N stages keep the source BN statistics in every "
            "condition; the earlier layers take the frames'. 0: every layer adapts. "
            f"(default {ADAPT.source_stages})"
        ),
    ] = None,
    adapt_wait: Annotated[
        bool,
        typer.Option(
            help="Run every due frame's update before the next frame, instead of skipping "
            "frames the worker has no time for: a recorded video then adapts the same way on "
            "every run, as bench.tta measures it (a live source drops the frames that arrive "
            "meanwhile). No --adapt-budget with it."
        ),
    ] = False,
    adapt_set: Annotated[
        list[str] | None,
        typer.Option(
            help="Any other adapter option as FIELD=VALUE, repeatable, e.g. prior_fade=1.5, "
            "condition_distance=0.2, confidence=0.5, size=256x512 (every field: "
            "docs/streaming.md)."
        ),
    ] = None,
) -> None:
    """Segment a video, camera, network stream or image folder; Ctrl-C finishes the outputs."""
    from adapt_deploy.stream import StreamOptions, run_stream
    from adapt_deploy.tta.session import setup_from_flags

    options = StreamOptions(
        out,
        labels_dir,
        stats,
        backend,
        precision,
        max_frames,
        show,
        alpha,
        fps,
        reconnect_timeout,
        device=device,
        force=force,
        cuda_graph=cuda_graph,
    )
    setup = setup_from_flags(
        adapt, adapt_every, adapt_params, lr, threshold, reset_policy, adapt_state, adapt_budget,
        adapt_bank, adapt_home, adapt_source_stages, adapt_set, adapt_wait,
    )  # fmt: skip
    summary = run_stream(source, bundle, options, reporter=_reporter(), adapt=setup)
    for line in summary.lines():
        console.print(escape(line), highlight=False)
    if summary.signal is not None:  # the shell convention for a run ended by a signal
        raise typer.Exit(128 + summary.signal)


kernels_app = typer.Typer(help="The fused CUDA kernels of the pooling ops: build and check.")
app.add_typer(kernels_app, name="kernels")


@kernels_app.command("build")
def kernels_build(
    arch: Annotated[
        str | None,
        typer.Option(
            help="GPU architectures, e.g. '8.0;9.0+PTX' (default: $TORCH_CUDA_ARCH_LIST, "
            "else the visible GPUs, else 8.0 to 9.0+PTX)."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show the compiler's output.")] = False,
) -> None:
    """Compile the kernels ahead of time into the cache ($ADAPT_DEPLOY_KERNELS_CACHE).

    Needs a CUDA build of torch, nvcc and ninja; no GPU.
    """
    from adapt_deploy.ops import cuda_build

    result = cuda_build.build(cuda_build.requested_archs(arch), verbose=verbose)
    console.print(f"built the CUDA kernels for {', '.join(result.archs)}: {result.library}")


@kernels_app.command("check")
def kernels_check() -> None:
    """Compile every kernel source with nvcc against torch's headers, as CI does (no GPU)."""
    from adapt_deploy.ops.compile_check import main as compile_check

    raise typer.Exit(compile_check([]))


@app.command()
def doctor() -> None:
    """What is installed and which backends work."""
    from adapt_deploy.doctor import run_checks

    checks = run_checks()
    table = Table(title=f"adapt-deploy {__version__}")
    for name in ("component", "found", "note"):
        table.add_column(name)
    for c in checks:  # escaped: hints such as pip install 'adapt-deploy[trt]' hold brackets
        found = escape(c.found) if c.ok else f"[red]{escape(c.found)}[/red]"
        table.add_row(escape(c.name), found, escape(c.advice))
    console.print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def _print_error(exc: BaseException) -> None:
    """One line on stderr; the message is escaped (a path or hint may contain [brackets])."""
    console = Console(stderr=True, soft_wrap=True)
    console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)


def main() -> None:
    """Entry point: user mistakes are printed as one clear line, never a traceback."""
    try:
        app()
    except UserError as exc:
        _print_error(exc)
        sys.exit(2)
    except ImportError as exc:  # torch or onnx on a base (deployment-only) install
        missing = missing_extra(exc)
        if missing is None:
            raise
        _print_error(missing)
        sys.exit(2)
    except OSError as exc:  # unwritable output, full disk: the file and the reason, no traceback
        _print_error(exc)
        sys.exit(1)
    except KeyboardInterrupt:  # typer turns most into exit 130 itself; this is the rest
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

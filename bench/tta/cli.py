"""The command line: the flags, then the methods, the throughput runs and the results."""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import bench.tta
from adapt_deploy.errors import UserError
from adapt_deploy.tta.settings import parse_settings
from bench.common import RESULTS, write_results
from bench.tta.conditions import STREAMS, WORK, render_conditions
from bench.tta.methods import method_makers
from bench.tta.model import (
    DEFAULT_CHECKPOINT,
    DEFAULT_SOURCE,
    ensure_bundle,
    model_description,
    require_checkpoint,
)
from bench.tta.report import plot, report
from bench.tta.runner import kept_torch_threads, run_method
from bench.tta.throughput import stream_fps, write_video


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tta", description=bench.tta.__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
        help="source checkpoint every method starts from (default: bench.adaptation's "
        "source-only model, seed 0)",
    )  # fmt: skip
    parser.add_argument(
        "--source-data", type=Path, default=DEFAULT_SOURCE,
        help="labelled source data for the bundle's adaptation package (source statistics)",
    )  # fmt: skip
    parser.add_argument(
        "--stream", choices=list(STREAMS), default="drive",
        help="drive (the defaults were set on it) or second (never tuned on)",
    )  # fmt: skip
    parser.add_argument(
        "--frames", type=int, default=None, help="frames per condition (default: the stream's)"
    )
    parser.add_argument(
        "--render-seed", type=int, default=None,
        help="render the stream's frames from this seed instead of its own (drive 0, second "
        "1): the same conditions on other scenes, to see how much a result owes to the frames",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=None,
        help="times the whole stream (all conditions) repeats (default: the stream's)",
    )  # fmt: skip
    parser.add_argument(
        "--methods",
        default="none,bn_stats,tent,sar,rdumb,cotta,ours,ours_no_bank",
        help="comma-separated methods to run, in order (see the module docstring for all)",
    )
    parser.add_argument(
        "--fps-rounds", type=int, default=3,
        help="throughput runs with and without adaptation, alternating (0: skip throughput)",
    )  # fmt: skip
    parser.add_argument("--fps-loops", type=int, default=5, help="stream rounds per fps run")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads of the PyTorch baselines"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="an AdaptOptions field of the ours* methods, e.g. "
        "lr=1e-3, reset=periodic:100, threshold=auto, size=128x256, threads=none (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--name", default=None,
        help="results name: bench/results/NAME.md and NAME.png (default: tta for drive, "
        "tta_second for second)",
    )  # fmt: skip
    return parser


def default_name(stream: str, render_seed: int | None = None) -> str:
    """The results name of a stream's run: each stream, and each other rendering of it, keeps
    its own file."""
    name = "tta" if stream == "drive" else f"tta_{stream}"
    return name if render_seed is None else f"{name}_seed{render_seed}"


def main(argv: list[str] | None = None) -> None:
    """Run the bench; a setting the model cannot take (e.g. more kept stages than its backbone
    has) ends in one line, not a traceback."""
    parser = build_parser()
    try:
        run(parser, parser.parse_args(argv))
    except UserError as exc:
        parser.error(str(exc))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        options = parse_settings(args.set, flag="--set")
    except UserError as exc:
        parser.error(str(exc))
    bundle = WORK / "bundle"
    makers = method_makers(args.checkpoint, bundle, options)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in makers]
    if unknown or not methods:
        parser.error(
            f"--methods: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(makers)}"
        )
    stream = STREAMS[args.stream]
    if args.render_seed is not None:
        if args.render_seed < 0:
            parser.error(f"--render-seed: expected a seed >= 0, got {args.render_seed}")
        if args.render_seed != stream.seed:
            stream = replace(stream, seed=args.render_seed)
        else:
            args.render_seed = None  # the stream's own frames: its own results name
    args.frames = stream.frames if args.frames is None else args.frames
    args.rounds = stream.rounds if args.rounds is None else args.rounds
    args.name = args.name or default_name(args.stream, args.render_seed)
    if args.rounds < 1 or args.frames < 1:
        parser.error("--rounds and --frames must be at least 1")
    require_checkpoint(args.checkpoint)
    torch.set_num_threads(args.threads)
    meta, exported = ensure_bundle(args.checkpoint, args.source_data, bundle)
    print(f"bundle {bundle}: {'exported now' if exported else 'reused (same checkpoint)'}")
    data = render_conditions(stream, args.frames)
    runs = []
    for name in methods:
        print(f"{name}:", flush=True)
        with kept_torch_threads():
            runs.append(run_method(makers[name](), data, stream, args.rounds))
    fps: dict[str, list[float]] = {"without": [], "with": [], "waited": []}
    worker = waited = None
    if args.fps_rounds:
        with tempfile.TemporaryDirectory() as tmp, kept_torch_threads():
            video = write_video(data, stream, Path(tmp) / "rounds.avi", args.fps_loops)
            for _ in range(args.fps_rounds):
                fps["without"].append(stream_fps(bundle, video, None)[0])
                value, worker = stream_fps(bundle, video, options)
                fps["with"].append(value)
                value, waited = stream_fps(bundle, video, options, wait=True)
                fps["waited"].append(value)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(runs, stream, args.rounds, RESULTS / f"{args.name}.png")
    package = meta["adaptation"].get("package", {}).get("summary", {})
    body = report(
        runs, stream, args.rounds, args.frames, options, fps, worker, package,
        name=args.name, model=model_description(args.checkpoint), waited=waited,
    )  # fmt: skip
    path = write_results(args.name, "On-device adaptation (bench/tta/)", body)
    runs_json = {
        r.name: {
            "mean": r.mean(),
            "clean_end": r.clean_end,
            "miou": {f"{rr}/{c}": v for (rr, c), v in r.miou.items()},
        }
        for r in runs
    }
    (WORK / f"{args.name}.json").write_text(json.dumps(runs_json, indent=1))
    print(body)
    print(f"wrote {path}")

"""Frame signatures on the streams: does the condition bank's routing see the conditions?

    python -m bench.tta.signatures [--checkpoint CKPT] [--source-data DIR] [--render-seed N]

For every condition of both streams (bench/tta/conditions.py), with the adapter bench.tta runs
(its bundle, its input preparation, the home signature and radius calibrated at export):
each frame's distance to home, how many frames fall inside the home radius, how far the frames
lie from their condition's mean signature, and the nearest other condition of the same stream
(distance between means). These are the numbers `adapt_deploy/tta/bank.py` and
docs/streaming.md quote. Writes bench/results/tta_signatures.md (tta_signatures_seedN.md with
--render-seed N); a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from adapt_deploy.bundle.meta import load_meta
from adapt_deploy.export.adaptation_package import load_package
from adapt_deploy.models.checkpoints import load_checkpoint
from adapt_deploy.models.signature import distance
from adapt_deploy.tta.adapter import OnlineAdapter
from adapt_deploy.tta.options import AdaptOptions
from bench.common import write_results
from bench.tta.conditions import STREAMS, WORK, Stream, render_conditions
from bench.tta.model import DEFAULT_CHECKPOINT, DEFAULT_SOURCE, ensure_bundle, require_checkpoint


def adapter_of(bundle: Path) -> OnlineAdapter:
    """The adapter `stream --adapt` would make for `bundle`, at its defaults."""
    meta = load_meta(bundle)
    package = load_package(bundle, meta)
    model, config = load_checkpoint(package.checkpoint)
    size = tuple(meta["evaluation"]["size"])
    return OnlineAdapter(
        model, config.input, package.stats, AdaptOptions(), (int(size[0]), int(size[1])),
        package.lse_k,
    )  # fmt: skip


def stream_rows(adapter: OnlineAdapter, stream: Stream) -> list[str]:
    """One Markdown row per condition of `stream` (see the module docstring)."""
    assert adapter.bank is not None and adapter.bank.home is not None
    home, radius = adapter.bank.home, adapter.bank.home_distance
    data = render_conditions(stream, stream.frames)
    signatures = {
        name: torch.stack([adapter.signature(adapter.prepare(image)) for image in data[name][0]])
        for name in stream.names
    }
    means = {name: s.mean(0) for name, s in signatures.items()}
    rows = []
    for name, s in signatures.items():
        to_home = np.array([distance(v, home) for v in s])
        spread = max(distance(v, means[name]) for v in s)
        others = sorted((distance(means[name], means[o]), o) for o in stream.names if o != name)
        close = [f"{o} {d:.3f}" for d, o in others if d < adapter.bank.condition_distance]
        rows.append(
            f"| {stream.name} | {name} | {to_home.min():.3f}-{to_home.max():.3f} | "
            f"{int((to_home < radius).sum())} of {len(s)} | {spread:.3f} | "
            f"{others[0][1]} {others[0][0]:.3f} | {', '.join(close) or '-'} |"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tta.signatures", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--source-data", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument(
        "--render-seed", type=int, default=None,
        help="render both streams from this seed (bench.tta --render-seed); results "
        "tta_signatures_seedN",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.render_seed is not None and args.render_seed < 0:
        parser.error(f"--render-seed: expected a seed >= 0, got {args.render_seed}")
    require_checkpoint(args.checkpoint)
    bundle = WORK / "bundle"
    ensure_bundle(args.checkpoint, args.source_data, bundle)
    adapter = adapter_of(bundle)
    assert adapter.bank is not None
    lines = [
        f"Home radius (calibrated at export on {adapter.stats.images} source images, their 99% "
        f"quantile): {adapter.bank.home_distance:.3f}. Condition distance (a frame joins the "
        f"nearest state within it): {adapter.bank.condition_distance}.",
        "",
        "| stream | condition | to home (min-max) | inside the home radius | "
        "farthest frame from its condition's mean | nearest other condition (means) | "
        "others within the condition distance |",
        "|---|---|---|---|---|---|---|",
    ]
    for stream in STREAMS.values():
        if args.render_seed is not None:
            stream = replace(stream, seed=args.render_seed)
        lines += stream_rows(adapter, stream)
    seeded = args.render_seed is not None
    if seeded:
        lines += ["", f"Both streams rendered from seed {args.render_seed}."]
    body = "\n".join(lines)
    name = f"tta_signatures_seed{args.render_seed}" if seeded else "tta_signatures"
    path = write_results(name, "Frame signatures on the bench/tta streams", body)
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

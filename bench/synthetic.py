"""Synthetic benchmark: renderer speed (one core) and the demo's source-only / WDA / oracle mIoU.
Writes bench/results/synthetic.md.

    python -m bench.synthetic [--work DIR] [--seconds 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import write_results
from bench.synthetic_render import measure_render_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="where the demo data and runs go (default: temp)")
    parser.add_argument("--seconds", type=float, default=5.0, help="render timing per style")
    args = parser.parse_args()

    speed = measure_render_speed(seconds=args.seconds)
    lines = [
        "## Renderer (256x512, one thread, image + label)",
        "",
        "| style | images/s |",
        "|---|---|",
    ]
    lines += [f"| {style} | {r['images_per_s']:.0f} |" for style, r in speed["styles"].items()]
    lines += ["", "Target: at least 100 images/s per style on one core.", ""]

    from adapt_deploy.demo import run_demo
    from adapt_deploy.progress import RichReporter

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        demo = run_demo(args.work or Path(tmp), RichReporter(), fresh=args.work is None)
        wall = time.perf_counter() - start
        lines += [
            "## The demo: source-only, WDA (pseudo-weak) and oracle on the target val split",
            "",
        ]
        lines += [demo.markdown()]
        lines += [f"- {m}: {s:.0f} s of training" for m, s in demo.seconds.items()]
        how = "from scratch" if args.work is None else f"reusing finished runs in {args.work}"
        steps = "synthesis, source-only pretraining, training and evaluation of each method"
        if demo.stream is not None:
            steps += ", export of wda_uda and streaming the demo video through it"
        lines += [f"- whole demo ({steps}): {wall:.0f} s, {how}"]
        so, orc = demo.results["source_only"].miou, demo.results["oracle"].miou
        wda = demo.results["wda_uda"].miou
        lines += [
            f"- mIoU: source-only {100 * so:.1f}, oracle {100 * orc:.1f} "
            f"(source-only reaches {so / orc:.0%} of the oracle); WDA {100 * wda:.1f}, "
            f"gap closed {(wda - so) / (orc - so):.0%}"
        ]
    path = write_results("synthetic", "Synthetic benchmark", "\n".join(lines))
    print(path.read_text())


if __name__ == "__main__":
    main()

"""Segmenter overhead and throughput on CPU: the runtime against a bare ONNX Runtime session.

    python -m bench.runtime [--bundle DIR] [--width 16] [--frames 30] [--threads N]

Without --bundle it uses a randomly initialised ResNet-18 DeepLab (--width, 16 by default;
speed does not depend on the weights), exported once into bench/.work/bundles/ (shared with
bench.stream). Cases: a 256x512 frame run at its own size, a 1080p
frame resized to 256x512 (`size=`) with its labels mapped back, and a batch of four 256x512
frames. The baseline is `session.run` on the same model and input in the same loop, one call
each in turn, so a shared machine's load hits both alike; the ratio is taken within this run.
Writes bench/results/runtime.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from adapt_deploy.runtime import Segmenter
from adapt_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from bench.common import random_bundle, write_results


def measure(bundle: Path, frames: int, threads: int | None) -> list[str]:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (256, 512, 3), np.uint8)
    full_hd = rng.integers(0, 256, (1080, 1920, 3), np.uint8)
    bare = OnnxRuntimeBackend(bundle / "model.onnx", threads=threads).outputs
    native = Segmenter.from_bundle(bundle, device="cpu", threads=threads)
    fixed = Segmenter.from_bundle(bundle, device="cpu", threads=threads, size=(256, 512))
    cases = {
        "256x512 frame, at its size": lambda: [native(small)],
        "1080x1920 frame, run at 256x512": lambda: [fixed(full_hd)],
        "batch of 4 256x512 frames": lambda: native.batch([small] * 4),
    }
    baseline = {
        "256x512 frame, at its size": small[None],
        "1080x1920 frame, run at 256x512": small[None],
        "batch of 4 256x512 frames": np.stack([small] * 4),
    }
    rows = [
        "| case | Segmenter ms/frame (p50) | preprocess | infer | postprocess | fps "
        "| session.run ms/frame (p50) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in cases.items():
        run()  # warm-up: sessions, bindings, resize tables
        bare(baseline[name])
        totals, parts, bare_times = [], {"preprocess": [], "infer": [], "postprocess": []}, []
        n = len(baseline[name])
        for _ in range(frames):
            start = time.perf_counter()
            results = run()
            totals.append((time.perf_counter() - start) / n)
            for key in parts:
                parts[key].append(results[0].timings[key])
            start = time.perf_counter()
            bare(baseline[name])
            bare_times.append((time.perf_counter() - start) / n)
        total, reference = statistics.median(totals), statistics.median(bare_times)
        p50 = {k: 1e3 * statistics.median(v) for k, v in parts.items()}
        rows.append(
            f"| {name} | {1e3 * total:.1f} | {p50['preprocess']:.2f} | {p50['infer']:.1f} | "
            f"{p50['postprocess']:.2f} | {1 / total:.1f} | {1e3 * reference:.1f} | "
            f"{total / reference:.2f} |"
        )
    native.close()
    fixed.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle", type=Path, help="bundle to measure (default: a random-weight ResNet-18)"
    )
    parser.add_argument(
        "--width", type=int, default=16, help="width of the random ResNet-18 (without --bundle)"
    )
    parser.add_argument("--frames", type=int, default=30, help="timed frames per case")
    parser.add_argument(
        "--threads", type=int, help="ONNX Runtime CPU threads (default: ONNX Runtime's choice)"
    )
    args = parser.parse_args(argv)
    bundle = args.bundle or random_bundle(args.width)
    what = str(args.bundle) if args.bundle else f"random ResNet-18 DeepLab, width {args.width}"
    rows = measure(bundle, args.frames, args.threads)
    body = "\n".join(
        [
            f"Bundle: {what}; ONNX Runtime CPU fp32, {args.frames} frames per case, "
            f"threads {args.threads or 'default'}. ratio = Segmenter / bare session.run "
            "(same model and input size, interleaved).",
            "",
            *rows,
        ]
    )
    path = write_results("runtime", "Runtime: Segmenter on CPU", body)
    print(body)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A perception loop around the runtime's Segmenter: frames in, labels and class presence out.

    python examples/perception_loop.py BUNDLE SOURCE [--backend auto] [--device 0]
        [--max-frames N] [--out DIR] [--adapt]

SOURCE is anything `adapt-deploy stream` reads: a video file, a camera index (0), an rtsp:// or
http(s):// URL, an image folder or a glob. `adapt_deploy.stream.open_source` opens it and yields
RGB frames (unreadable ones skipped, folders in natural order); the robot's own logic goes where
this example computes the drivable share of the image. With --out, colour overlays are written
as PNGs. With --adapt (a bundle exported with --source-data; needs torch), a background worker
keeps adapting the Segmenter's model on the frames, as `adapt-deploy stream --adapt` does: the
loop only offers each frame, it never waits for the adapter.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from adapt_deploy.errors import UserError
from adapt_deploy.runtime import Segmenter, colour_table, overlay
from adapt_deploy.stream import Source, open_source


def start_adapter(bundle: str, seg: Segmenter):
    """The stream's on-device adaptation worker around `seg`, started (needs torch)."""
    from adapt_deploy.tta.options import AdaptOptions
    from adapt_deploy.tta.session import AdaptSetup, open_adaptation

    return open_adaptation(Path(bundle), seg, AdaptSetup(AdaptOptions())).start()


def run(seg: Segmenter, source: Source, args: argparse.Namespace, adapter) -> list[float]:
    """Segment `source` frame by frame; the segmenter's latency of each frame, in seconds."""
    table = colour_table(seg.palette)
    threshold = seg.meta.get("adaptation", {}).get("pseudo_threshold", 0.5)
    drivable = [seg.classes.index(c) for c in ("road", "sidewalk") if c in seg.classes]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    latencies: list[float] = []
    for frame in source.frames(threading.Event()):
        if args.max_frames and len(latencies) >= args.max_frames:
            break
        i = frame.index  # its position in the source (unreadable images keep their numbers)
        result = seg(frame.image)  # labels (H, W) uint8 at the frame's size, presence (C,)
        latencies.append(result.timings["total"])
        if adapter is not None:
            adapter.offer(frame.image, result.presence, i)  # queued or skipped, never waits
        share = float(np.isin(result.labels, drivable).mean())
        present = [seg.classes[c] for c in np.flatnonzero(result.presence > threshold)]
        print(
            f"frame {i}: {1e3 * result.timings['total']:.1f} ms, drivable {share:.0%}, "
            f"present: {', '.join(present) or '-'}"
        )
        if args.out:
            image = overlay(frame.image, result.labels, table, 0.5)
            cv2.imwrite(str(args.out / f"{i:06d}.png"), image[:, :, ::-1])
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="a bundle directory written by `adapt-deploy export`")
    parser.add_argument(
        "source", help="video file, camera index (0), rtsp:// or http(s):// URL, folder or glob"
    )
    parser.add_argument(
        "--backend", default="auto", help="auto, onnxruntime, tensorrt or torch (default auto)"
    )
    parser.add_argument(
        "--device",
        default="0",
        help="GPU index (the CPU when no GPU backend is usable), cuda:N or cpu (default 0)",
    )
    parser.add_argument(
        "--max-frames", type=int, default=0, help="stop after this many frames (0: all)"
    )
    parser.add_argument("--out", type=Path, help="write colour overlays as DIR/{index:06d}.png")
    parser.add_argument("--adapt", action="store_true", help="keep adapting on the frames")
    args = parser.parse_args(argv)

    try:
        with Segmenter.from_bundle(args.bundle, backend=args.backend, device=args.device) as seg:
            print(seg)
            source = open_source(args.source)
            adapter = None
            try:
                adapter = start_adapter(args.bundle, seg) if args.adapt else None
                start = time.perf_counter()
                latencies = run(seg, source, args, adapter)
                elapsed = time.perf_counter() - start
            finally:
                source.close()
                if adapter is not None:
                    print("\n".join(adapter.close().lines()))
    except UserError as exc:  # a wrong bundle, source or option: one line, no traceback
        raise SystemExit(f"error: {exc}") from None
    if latencies:
        print(
            f"{len(latencies)} frames, {len(latencies) / elapsed:.1f} fps end to end, "
            f"median segmenter latency {1e3 * float(np.median(latencies)):.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

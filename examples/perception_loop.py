"""A perception loop around the runtime's Segmenter: frames in, labels and class presence out.

    python examples/perception_loop.py BUNDLE SOURCE [--backend auto] [--device 0]
        [--max-frames N] [--out DIR] [--adapt]

SOURCE is a video file, a camera index (0) or a folder of images. Frames are read with OpenCV
(BGR) and passed to the Segmenter as RGB; the robot's own logic goes where this example
computes the drivable share of the image. With --out, colour overlays are written as PNGs.
With --adapt (a bundle exported with --source-data; needs torch), a background worker keeps
adapting the Segmenter's model on the frames, as `adapt-deploy stream --adapt` does: the loop
only offers each frame, it never waits for the adapter.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from adapt_deploy.runtime import Segmenter, colour_table, overlay

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def read_frames(source: str) -> Iterator[np.ndarray]:
    """RGB uint8 frames from a folder of images, a video file or a camera index."""
    if Path(source).is_dir():
        for path in sorted(p for p in Path(source).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            yield cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]
        return
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        raise SystemExit(f"cannot open {source} (not a folder, a readable video or a camera)")
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            yield bgr[:, :, ::-1]  # a view: the Segmenter copies it once into its input buffer
    finally:
        capture.release()


def start_adapter(bundle: str, seg: Segmenter):
    """The stream's on-device adaptation worker around `seg`, started (needs torch)."""
    from adapt_deploy.tta.options import AdaptOptions
    from adapt_deploy.tta.session import AdaptSetup, open_adaptation

    return open_adaptation(Path(bundle), seg, AdaptSetup(AdaptOptions())).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("source")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="0")
    parser.add_argument("--max-frames", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--adapt", action="store_true", help="keep adapting on the frames")
    args = parser.parse_args(argv)
    device = int(args.device) if args.device.isdigit() else args.device

    with Segmenter.from_bundle(args.bundle, backend=args.backend, device=device) as seg:
        print(seg)
        adapter = start_adapter(args.bundle, seg) if args.adapt else None
        table = colour_table(seg.palette)
        threshold = seg.meta.get("adaptation", {}).get("pseudo_threshold", 0.5)
        drivable = [seg.classes.index(c) for c in ("road", "sidewalk") if c in seg.classes]
        latencies = []
        start = time.perf_counter()
        for i, frame in enumerate(read_frames(args.source)):
            if args.max_frames and i >= args.max_frames:
                break
            result = seg(frame)  # labels (H, W) uint8 at the frame's size, presence (C,)
            latencies.append(result.timings["total"])
            if adapter is not None:
                adapter.offer(frame, result.presence, i)  # queued or skipped, never waits
            share = float(np.isin(result.labels, drivable).mean())
            present = [seg.classes[c] for c in np.flatnonzero(result.presence > threshold)]
            print(
                f"frame {i}: {1e3 * result.timings['total']:.1f} ms, drivable {share:.0%}, "
                f"present: {', '.join(present) or '-'}"
            )
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                image = overlay(frame, result.labels, table, 0.5)
                cv2.imwrite(str(args.out / f"{i:06d}.png"), image[:, :, ::-1])
        elapsed = time.perf_counter() - start
        if adapter is not None:
            print("\n".join(adapter.close().lines()))
    if latencies:
        print(
            f"{len(latencies)} frames, {len(latencies) / elapsed:.1f} fps end to end, "
            f"median segmenter latency {1e3 * float(np.median(latencies)):.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

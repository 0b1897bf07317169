"""Render speed of the synthetic benchmark: images/s per style on one CPU thread."""

from __future__ import annotations

import time

import cv2

from adapt_deploy.data.synthetic import STYLES, render_image


def measure_render_speed(height: int = 256, width: int = 512, seconds: float = 5.0) -> dict:
    """Images (with labels) per second for each style, single-threaded, over ~`seconds` each."""
    cv2.setNumThreads(1)
    result: dict = {"height": height, "width": width, "threads": 1, "styles": {}}
    per_style = seconds / len(STYLES)
    for style in STYLES:
        render_image(0, style, 0, height, width)  # warm the texture caches
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < per_style or count < 5:
            render_image(0, style, count, height, width)
            count += 1
        result["styles"][style] = {
            "images": count,
            "seconds": round(elapsed, 3),
            "images_per_s": round(count / elapsed, 1),
            "ms_per_image": round(1000 * elapsed / count, 2),
        }
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(measure_render_speed(), indent=2))

"""Write what the base-install check of .ci/run streams: a tiny randomly initialised DeepLab
exported as a bundle with `adapt-deploy export` (the full install does this), and a short
dashcam-like clip encoded by OpenCV. Usage: python .ci/tiny_bundle.py OUT_DIR"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from adapt_deploy.config import from_dict
from adapt_deploy.models.checkpoints import build_model, checkpoint_meta, save_checkpoint


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = from_dict(
        {
            "name": "ci-tiny",
            "model": {"backbone": "resnet18", "width": 8, "num_classes": 19},
            "data": {"val": {"kind": "cityscapes", "root": ".", "split": "val", "size": [32, 64]}},
        },
        source="ci",
    )
    checkpoint = out / "tiny.pt"
    save_checkpoint(checkpoint, build_model(config.model), checkpoint_meta(config, 0))
    export = [sys.executable, "-m", "adapt_deploy.cli", "export", str(checkpoint)]
    subprocess.run([*export, "--out", str(out / "bundle"), "--force"], check=True)
    writer = cv2.VideoWriter(str(out / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (128, 72))
    rng = np.random.default_rng(0)
    for _ in range(20):
        writer.write(rng.integers(0, 256, (72, 128, 3), dtype=np.uint8))
    writer.release()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""What a base install (`pip install adapt-deploy[cpu]`: no torch, no onnx) can and cannot do,
run in a fresh interpreter whose imports of torch, onnx, onnxscript and PIL fail as they do
there: stream and verify a bundle; commands of the training stack say in one line what to
install, with no traceback. .ci/run repeats the first part in a real venv without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from adapt_deploy.extras import TRAIN_INSTALL, TRAIN_MODULES

BLOCK = f"""
import sys
class BaseInstall:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {TRAIN_MODULES!r}:
            raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)
sys.meta_path.insert(0, BaseInstall())
sys.argv = ['adapt-deploy', *sys.argv[1:]]
from adapt_deploy.cli import main
main()
"""


def adapt_deploy(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", BLOCK, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 64))
    rng = np.random.default_rng(0)
    for _ in range(8):
        writer.write(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    writer.release()
    return path


def test_streams_and_verifies_a_bundle_without_torch(tiny_bundle: Path, clip: Path, tmp_path):
    result = adapt_deploy("stream", clip, "--bundle", tiny_bundle, "--out", "o.mp4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o.mp4").stat().st_size > 0
    result = adapt_deploy("verify", tiny_bundle, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "verified on onnxruntime" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--config", "missing.yaml"],
        ["export", "tiny.pt", "--out", "b"],
        ["stream", "{clip}", "--bundle", "{bundle}", "--backend", "torch", "--out", "t.mp4"],
        ["stream", "{clip}", "--bundle", "{bundle}", "--adapt", "--out", "a.mp4"],
    ],
    ids=["train", "export", "stream-torch", "stream-adapt"],
)
def test_training_stack_commands_say_what_to_install(args, tiny_bundle, clip, tmp_path):
    args = [a.format(clip=clip, bundle=tiny_bundle) for a in args]
    result = adapt_deploy(*args, cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and TRAIN_INSTALL in errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not list(tmp_path.glob("*.mp4"))  # refused before any output was written

"""The options of `adapt-deploy stream`, and their range checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapt_deploy.errors import UserError
from adapt_deploy.runtime.selection import parse_device


@dataclass
class StreamOptions:
    """The options of `adapt-deploy stream` (see its --help)."""

    out: Path | None = None
    labels_dir: Path | None = None
    stats: Path | None = None
    backend: str = "auto"
    precision: str = "auto"
    max_frames: int | None = None
    show: bool = False
    alpha: float = 0.5
    fps: float | None = None  # of an image folder, or of a source that does not say
    reconnect_timeout: float = 30.0
    queue_size: int = 2  # frames waiting between two stages; more only adds latency
    device: int | str = 0  # a GPU index, "cuda:N" or "cpu", as Segmenter.from_bundle takes
    force: bool = False  # replace outputs that already exist (never an input)
    cuda_graph: bool | None = None  # replay CUDA graphs (None: the backend's default)

    def check(self) -> None:
        """UserError naming the option when a value is out of range."""
        parse_device(self.device, "--device")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha must be between 0 and 1, got {self.alpha}")
        if self.max_frames is not None and self.max_frames < 1:
            raise UserError(f"--max-frames must be at least 1, got {self.max_frames}")
        if self.fps is not None and self.fps <= 0:
            raise UserError(f"--fps must be positive, got {self.fps}")
        if self.reconnect_timeout < 0:
            raise UserError(f"--reconnect-timeout must be >= 0, got {self.reconnect_timeout}")

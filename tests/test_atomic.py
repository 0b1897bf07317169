"""Atomic writes give files ordinary permissions, whatever mkstemp chose for the temp file."""

from __future__ import annotations

import os
import stat

import torch

from adapt_deploy.atomic import atomic_write, current_umask
from adapt_deploy.models.checkpoints import atomic_save


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_mode_an_ordinary_open_gives(tmp_path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write(tmp_path / "atomic.txt", "x")
    atomic_save({"w": torch.zeros(1)}, tmp_path / "ckpt.pth")
    assert mode(tmp_path / "atomic.txt") == mode(plain) == 0o666 & ~current_umask()
    assert mode(tmp_path / "ckpt.pth") == mode(plain)
    assert torch.load(tmp_path / "ckpt.pth", weights_only=True)["w"].shape == (1,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.txt", "ckpt.pth", "plain.txt"]

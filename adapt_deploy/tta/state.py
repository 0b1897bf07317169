"""Saving and resuming an adapter's state (`--adapt-state FILE`): weights, test statistics,
optimizer and counters, tied to the checkpoint the bundle was exported from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adapt_deploy.errors import UserError
from adapt_deploy.models.checkpoints import atomic_save
from adapt_deploy.tta.adapter import STATE_FORMAT, STATE_VERSION, OnlineAdapter


def save_state(adapter: OnlineAdapter, path: Path) -> None:
    """Write the adapter's state atomically (a crash never leaves half a file)."""
    atomic_save(adapter.state_dict(), Path(path))


def load_state(path: Path, adapter: OnlineAdapter) -> dict[str, Any]:
    """The state saved at `path`, checked against this adapter; UserError naming the field."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and why
        raise UserError(f"--adapt-state {path}: not a readable adaptation state ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"--adapt-state {path}: field 'format': expected {STATE_FORMAT!r}")
    if state.get("version") != STATE_VERSION:
        raise UserError(
            f"--adapt-state {path}: field 'version': expected {STATE_VERSION}, "
            f"got {state.get('version')!r}"
        )
    if state.get("checkpoint_sha256") != adapter.checkpoint_sha256:
        raise UserError(
            f"--adapt-state {path}: field 'checkpoint_sha256': saved from another model "
            f"({str(state.get('checkpoint_sha256'))[:16]}…) than this bundle's "
            f"({adapter.checkpoint_sha256[:16]}…); use a new --adapt-state file"
        )
    if state.get("params") != adapter.options.params:
        raise UserError(
            f"--adapt-state {path}: field 'params': saved with --adapt-params "
            f"{state.get('params')!r}, this run uses {adapter.options.params!r}"
        )
    return state


def resume(adapter: OnlineAdapter, path: Path | None) -> bool:
    """Load `path` into `adapter` when the file exists; whether it did."""
    if path is None or not Path(path).exists():
        return False
    adapter.load_state_dict(load_state(Path(path), adapter))
    return True

"""Saving and resuming an adapter's state (`--adapt-state FILE`): weights, test statistics,
optimizer, counters and the condition bank, tied to the checkpoint the bundle was exported
from. Version-1 files (before the bank) still load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adapt_deploy.errors import UserError
from adapt_deploy.models.checkpoints import atomic_save, load_weights_only, mismatched_keys
from adapt_deploy.tta.adapter import STATE_FORMAT, STATE_VERSION, OnlineAdapter
from adapt_deploy.tta.bank import HOME

READABLE_VERSIONS = (1, STATE_VERSION)


def save_state(adapter: OnlineAdapter, path: Path) -> None:
    """Write the adapter's state atomically (a crash never leaves half a file)."""
    atomic_save(adapter.state_dict(), Path(path))


def load_state(path: Path, adapter: OnlineAdapter) -> dict[str, Any]:
    """The state saved at `path`, checked against this adapter; UserError naming the field."""
    path = Path(path)
    try:
        state = load_weights_only(path, "adaptation state")
    except UserError as exc:
        raise UserError(f"--adapt-state {exc}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"--adapt-state {path}: field 'format': expected {STATE_FORMAT!r}")
    if state.get("version") not in READABLE_VERSIONS:
        raise UserError(
            f"--adapt-state {path}: field 'version': expected one of {list(READABLE_VERSIONS)}, "
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
    for name in ("student", "teacher"):
        _check_tensors(path, name, state.get(name), getattr(adapter, name))
    _check_optimizer(path, state.get("optimizer"), adapter.optimizer)
    _check_counters(path, state.get("counters"))
    if state["version"] >= 2:
        _check_bank(path, state.get("bank"), state.get("active"), adapter)
    return state


def _check_tensors(path: Path, field: str, saved: Any, module: torch.nn.Module) -> None:
    """UserError naming the first entry of `saved` whose name or shape differs from `module`'s."""
    if not isinstance(saved, dict):
        raise UserError(f"--adapt-state {path}: field {field!r}: expected a dict of tensors")
    expected = module.state_dict()
    shape, missing, unexpected = mismatched_keys(expected, saved)
    where = f"--adapt-state {path}: field '{field}."
    if shape:
        key = shape[0]
        raise UserError(
            f"{where}{key}': expected shape {tuple(expected[key].shape)}, got "
            f"{tuple(getattr(saved[key], 'shape', ()))} (saved from another model?)"
        )
    if missing:
        raise UserError(f"{where}{missing[0]}' is missing")
    if unexpected:
        raise UserError(f"{where}{unexpected[0]}' is not in this model")


def _check_optimizer(path: Path, saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """UserError when the saved optimizer state does not fit `optimizer`'s parameters."""
    where = f"--adapt-state {path}: field 'optimizer'"
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        raise UserError(f"{where}: expected an optimizer state with 'param_groups'")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    indices = [i for group in saved["param_groups"] for i in group.get("params", [])]
    if len(indices) != len(params):
        raise UserError(f"{where}: holds {len(indices)} parameters, this run trains {len(params)}")
    for index, param in zip(indices, params, strict=True):
        buffer = saved.get("state", {}).get(index, {}).get("momentum_buffer")
        if isinstance(buffer, torch.Tensor) and buffer.shape != param.shape:
            raise UserError(
                f"{where}: momentum of parameter {index} has shape {tuple(buffer.shape)}, "
                f"expected {tuple(param.shape)}"
            )


def _check_counters(path: Path, counters: Any) -> None:
    """UserError unless `counters` holds the integer counts the adapter resumes from."""
    ok = (
        isinstance(counters, dict)
        and all(isinstance(counters.get(k), int) for k in ("updates", "rollbacks"))
        and isinstance(counters.get("reasons"), dict)
    )
    if not ok:
        raise UserError(
            f"--adapt-state {path}: field 'counters': expected integer 'updates', 'rollbacks' "
            "and a 'reasons' table"
        )


def _check_bank(path: Path, bank: Any, active: Any, adapter: OnlineAdapter) -> None:
    """UserError naming the first field of the saved bank that does not fit this adapter."""
    where = f"--adapt-state {path}: field"
    if not (active is None or active == HOME or (isinstance(active, int) and active >= 0)):
        raise UserError(f"{where} 'active': expected {HOME!r}, a condition number or null")
    if bank is None:
        return
    numbers = ("clock", "next_key")
    if not isinstance(bank, dict) or not all(isinstance(bank.get(k), int) for k in numbers):
        raise UserError(f"{where} 'bank': expected a table with integer 'clock', 'next_key'")
    entries = bank.get("entries")
    if not isinstance(entries, list):
        raise UserError(f"{where} 'bank.entries': expected a list")
    width = 2 * adapter.student.backbone.conv1.out_channels
    for i, entry in enumerate(entries):
        at = f"{where} 'bank.entries[{i}]"
        ints = ("key", "frames", "last_used")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), int) for k in ints):
            raise UserError(f"{at}': expected integer 'key', 'frames', 'last_used'")
        signature = entry.get("signature")
        if not isinstance(signature, torch.Tensor) or tuple(signature.shape) != (width,):
            raise UserError(f"{at}.signature': expected a tensor of shape ({width},)")
        state = entry.get("state")
        if not isinstance(state, dict):
            raise UserError(f"{at}.state': expected a table per role")
        for role, live in adapter.changing.items():
            saved = state.get(role)
            if not isinstance(saved, dict) or set(saved) != set(live):
                raise UserError(f"{at}.state.{role}': expected the tensors {sorted(live)[:3]}…")
            for name, value in live.items():
                got = saved[name]
                if not isinstance(got, torch.Tensor) or got.shape != value.shape:
                    raise UserError(
                        f"{at}.state.{role}.{name}': expected shape {tuple(value.shape)}"
                    )


def resume(adapter: OnlineAdapter, path: Path | None) -> bool:
    """Load `path` into `adapter` when the file exists; whether it did."""
    if path is None or not Path(path).exists():
        return False
    adapter.load_state_dict(load_state(Path(path), adapter))
    return True

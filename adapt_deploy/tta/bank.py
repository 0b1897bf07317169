"""Which condition a frame shows, and the adapted state kept for each condition.

Adapting one set of weights to everything a car sees forgets: after an hour of snow the model
is a snow model, and the first clear-weather frames pay for it. Instead the adapter keeps

- the **home** state: the deployed model itself, never adapted. A frame whose signature lies
  within `home_distance` of the source images' mean signature (both computed at export, see
  `export.source_stats`: the radius holds 99% of the source images) is a home frame; the
  runtime runs the source weights for it and nothing is learned from it. A package written
  before this calibration has no home: every frame goes to the bank.
- a **bank** of adapted states (every tensor adapting can change: BN statistics and affine
  parameters, of student and teacher), one per detected condition, at most `capacity`. A frame
  goes to the nearest entry within `condition_distance`; a frame near none starts a new entry
  from the source state. When the bank is full, the entry used least recently gives way
  (least-recently-used eviction: the entry in use was used last, so it stays unless the bank
  holds one entry).

The **signature** of a frame (`models.signature`) is what the first BatchNorm sees: per channel
of the stem convolution's output, the frame's mean and log standard deviation in units of the
layer's running statistics. Measured on the benchmark's source-only model
(`python -m bench.tta.signatures`, bench/results/tta_signatures.md, 128×256; the model trained
again on 2026-12-07): on stream 'drive', frames of one condition lie within 0.14 of their
condition's mean and conditions lie 0.19 or more apart, hence the default `condition_distance`
0.15; the source images' home radius is 0.35, source-style frames lie 0.19-0.26 from the home
signature, every other frame of both streams 0.46 or more. The stem does not tell every
condition apart: on stream 'second', noise and motion blur lie 0.05-0.10 from the clean target
(means) and share its state, and fog 1's frames spread up to 0.17 from their mean.

The distance of a condition's signature to home also sets how much of the source's BN
statistics its state keeps (`AdaptOptions.prior_fade`, see `adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from adapt_deploy.models.signature import distance

HOME = "home"


@dataclass
class Entry:
    """One condition's adapted state: {tensor name: value} per role (student, teacher)."""

    key: int
    signature: torch.Tensor  # running mean of its frames' signatures
    state: dict[str, dict[str, torch.Tensor]]
    frames: int = 0  # frames routed to it
    last_used: int = 0  # the bank's clock when a frame last went to it


@dataclass
class Route:
    """Where one frame goes: HOME or an entry key; `new`: that entry was made for it;
    `evicted`: the key that gave way for it; `distance`: to home or to the chosen entry."""

    key: str | int
    distance: float
    new: bool = False
    evicted: int | None = None


@dataclass
class ConditionBank:
    """See the module docstring. Holds states; the adapter copies them in and out."""

    capacity: int = 8
    home: torch.Tensor | None = None  # the source images' mean signature; None: no home
    home_distance: float = 0.0
    condition_distance: float = 0.15
    smoothing: float = 0.9  # of an entry's signature mean
    entries: dict[int, Entry] = field(default_factory=dict)
    clock: int = 0
    next_key: int = 0

    def route(self, signature: torch.Tensor, fresh: dict[str, dict[str, torch.Tensor]]) -> Route:
        """The frame's condition. A new entry starts from `fresh` (the source state, copied)."""
        self.clock += 1
        home = distance(signature, self.home) if self.home is not None else float("inf")
        if home < self.home_distance:
            return Route(HOME, home)
        nearest = min(
            ((distance(signature, e.signature), k) for k, e in self.entries.items()),
            default=None,
        )
        if nearest is not None and nearest[0] < self.condition_distance:
            entry = self.entries[nearest[1]]
            entry.signature.mul_(self.smoothing).add_(signature, alpha=1 - self.smoothing)
            entry.frames += 1
            entry.last_used = self.clock
            return Route(entry.key, nearest[0])
        evicted = self._evict_least_recent() if len(self.entries) >= self.capacity else None
        key = self.next_key
        self.next_key += 1
        state = {role: {k: v.clone() for k, v in t.items()} for role, t in fresh.items()}
        self.entries[key] = Entry(key, signature.clone(), state, 1, self.clock)
        return Route(key, home, new=True, evicted=evicted)

    def state_dict(self) -> dict[str, Any]:
        """Plain containers of tensors and numbers (loads with weights_only=True)."""
        return {
            "capacity": self.capacity,
            "clock": self.clock,
            "next_key": self.next_key,
            "entries": [
                {
                    "key": e.key,
                    "signature": e.signature.clone(),
                    "state": {r: {k: v.cpu() for k, v in t.items()} for r, t in e.state.items()},
                    "frames": e.frames,
                    "last_used": e.last_used,
                }
                for e in self.entries.values()
            ],
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Resume from `state_dict()` output (checked by `tta.state` first). Entries beyond
        this bank's capacity give way by the eviction rule."""
        self.clock = int(state["clock"])
        self.next_key = int(state["next_key"])
        self.entries = {}
        for e in state["entries"]:
            tensors = {r: {k: v.to(device) for k, v in t.items()} for r, t in e["state"].items()}
            self.entries[int(e["key"])] = Entry(
                int(e["key"]),
                e["signature"].float().clone(),
                tensors,
                int(e["frames"]),
                int(e["last_used"]),
            )
        while len(self.entries) > self.capacity:
            self._evict_least_recent()

    def _evict_least_recent(self) -> int:
        """Drop the entry used least recently; its key."""
        key = min(self.entries.values(), key=lambda e: e.last_used).key
        del self.entries[key]
        return key

"""The settings of on-device adaptation (`adapt-deploy stream --adapt ...`), checked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adapt_deploy.errors import UserError

PARAM_SETS = ("bn", "bn+head", "all")
STUDENT_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ResetPolicy:
    """When the adapter returns to the source weights: on collapse, every N updates, both."""

    on_collapse: bool = True
    every: int | None = None  # updates

    @classmethod
    def parse(cls, text: str) -> ResetPolicy:
        """'collapse' | 'periodic:N' | 'collapse+periodic:N' | 'none'."""
        on_collapse, every = False, None
        for part in filter(None, text.strip().lower().split("+")):
            if part == "collapse":
                on_collapse = True
            elif part == "none":
                continue
            elif part.startswith("periodic:") and part[9:].isdigit() and int(part[9:]) > 0:
                every = int(part[9:])
            else:
                raise UserError(
                    f"--reset-policy: expected 'collapse', 'periodic:N', "
                    f"'collapse+periodic:N' or 'none', got {text!r}"
                )
        return cls(on_collapse, every)

    def __str__(self) -> str:
        parts = (["collapse"] if self.on_collapse else []) + (
            [f"periodic:{self.every}"] if self.every else []
        )
        return "+".join(parts) or "none"


@dataclass(frozen=True)
class AdaptOptions:
    """What the adapter learns, how fast, how often, and how it stays safe.

    Picked on bench/tta's stream 'drive', never on 'second': `source_stages` 2 with
    `prior_fade` 1.25 (session 18: 10-round runs keeping the source statistics in the last 1,
    2 or 3 stages, or none, with fades 1, 1.25, 1.5 and 2; 1.25 the smallest that keeps every
    round's clear-weather frames within 0.5 of no adaptation; the table is in the issue-20
    notes); `bn_momentum` 0.05, `lr` 0.05 with the pixel term instead of the entropy term
    (session 17: cumulative statistics with and without the fade, lr 0.05 and 0.1, the entropy
    and pixel terms, confidence 0, 0.5 and 0.7, every 2, restore 0, sharpness-aware steps);
    `confidence` 0.7 and the restore from earlier screens (session 13); `bank_size` 0 is
    compared as ours_no_bank, `every` with 1 and 64; the distances come from measured
    signatures (see `bank`); every other default is set by hand.
    """

    every: int = 4  # offer every k-th frame (a detected shift offers the frame at once)
    params: str = "bn"  # "bn" | "bn+head" | "all"
    lr: float = 0.05  # high for BN affine: each condition has its own state (see bank_size)
    momentum: float = 0.9  # SGD
    threshold: float | None = None  # global presence threshold T; None: per-class, calibrated
    weak_weight: float = 1.0  # Eq. 2 on the teacher's pseudo-weak labels
    entropy_weight: float = 0.0  # entropy on the teacher's confident pixels
    pixel_weight: float = 1.0  # cross-entropy to the teacher's labels on its confident pixels
    prototype_weight: float = 0.0  # Eq. 3 pooled features toward the source prototypes
    confidence: float = 0.7  # teacher softmax above which a pixel is confident
    bn_prior: float = 0.0  # λ: weight of the source statistics in the normalization (at least)
    # the n-th frame of a condition weighs 1/n in its test statistics (their plain mean) until
    # that falls to this: each later frame weighs this much
    bn_momentum: float = 0.05
    # λ of a condition: 1 at the home radius, falling linearly to bn_prior this many home radii
    # further out (by its signature's distance to home; 0: bn_prior for every condition)
    prior_fade: float = 1.25
    # the BN layers of the backbone's last this many stages (and any after the backbone) keep
    # the source statistics in every condition (λ = 1): test statistics adapt the early layers,
    # where weather changes the image, and leave the class-level layers as trained (0: every
    # layer adapts)
    source_stages: int = 2
    # the student's forward (and so its backward) under bf16 autocast in channels_last, the
    # parameters, test statistics and losses fp32: "auto" is bf16 on a GPU that computes in bf16
    # (the fast path of training) and fp32 on the CPU, where bf16's speed depends on the CPU's
    # instructions (bench/results/tta_student_bf16.md: its quality on drive)
    student_precision: str = "auto"
    ema: float = 0.9  # teacher = ema · teacher + (1 − ema) · student
    restore: float = 0.01  # stochastic restore: share of student weights set back per update
    reset: ResetPolicy = ResetPolicy()
    collapse_classes: float = 0.5  # collapse: predicted classes below this share of the source's
    collapse_entropy: float = 0.25  # collapse: mean entropy below this share of the source's
    sync_every: int = 1  # push the teacher to the runtime every this many updates
    # The condition bank (tta/bank.py): one adapted state per detected condition, the source
    # state for home frames. 0 entries: one adapted state for everything, no home.
    bank_size: int = 8  # adapted states kept; the least recently used gives way
    # signature distance to the source's within which a frame is home; None: the radius the
    # export calibrated on the source images; 0: no frame is home
    home_distance: float | None = None
    condition_distance: float = 0.15  # nearest entry within this takes the frame, else new
    budget: float = 0.15  # the worker's busy time at most this share of wall time
    size: tuple[int, int] | None = None  # (H, W) frames are resized to; None: the bundle's
    threads: int | None = 1  # torch CPU threads (a per-process setting; None: leave it)
    seed: int = 0

    def check(self) -> AdaptOptions:
        """UserError naming the flag whose value is out of range; returns self."""
        bad: list[str] = []
        if self.every < 1:
            bad.append(f"--adapt-every must be >= 1, got {self.every}")
        if self.params not in PARAM_SETS:
            bad.append(f"--adapt-params must be one of {list(PARAM_SETS)}, got {self.params!r}")
        if not self.lr > 0:
            bad.append(f"--lr must be positive, got {self.lr}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            bad.append(f"--threshold must be in (0, 1) or 'auto', got {self.threshold}")
        for name in ("weak_weight", "entropy_weight", "pixel_weight", "prototype_weight"):
            if getattr(self, name) < 0:
                bad.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("bn_prior", "bn_momentum", "ema", "restore", "confidence"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.prior_fade >= 0.0:
            bad.append(f"prior_fade must be >= 0, got {self.prior_fade}")
        if self.source_stages < 0:
            bad.append(f"--adapt-source-stages must be >= 0, got {self.source_stages}")
        if self.student_precision not in STUDENT_PRECISIONS:
            bad.append(
                f"student_precision must be one of {list(STUDENT_PRECISIONS)}, "
                f"got {self.student_precision!r}"
            )
        if self.sync_every < 1:
            bad.append(f"sync_every must be >= 1, got {self.sync_every}")
        if self.bank_size < 0:
            bad.append(f"--adapt-bank must be >= 0, got {self.bank_size}")
        if self.home_distance is not None and not self.home_distance >= 0.0:
            bad.append(f"home_distance must be >= 0 or None, got {self.home_distance}")
        if not self.condition_distance >= 0.0:
            bad.append(f"condition_distance must be >= 0, got {self.condition_distance}")
        if not 0.0 < self.budget <= 1.0:
            bad.append(f"--adapt-budget must be in (0, 1], got {self.budget}")
        if bad:
            raise UserError("; ".join(bad))
        return self


def parse_threshold(text: str) -> float | None:
    """'auto' → None (calibrated per class); a number in (0, 1) → that global T."""
    return _auto_or_number(text, "--threshold", "a number in (0, 1)", lambda v: 0.0 < v < 1.0)


def parse_home(text: str) -> float | None:
    """--adapt-home: 'auto' → None (the radius calibrated at export); a distance >= 0."""
    return _auto_or_number(text, "--adapt-home", "a distance >= 0", lambda v: v >= 0.0)


def _auto_or_number(
    text: str, flag: str, expected: str, valid: Callable[[float], bool]
) -> float | None:
    """'auto' → None; else the number, when `valid`; UserError naming `flag` otherwise."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not valid(value):
        raise UserError(f"{flag}: expected 'auto' or {expected}, got {text!r}")
    return value

"""Which target pixels to ask an annotator for: LabOR's two selections and two baselines.

LabOR (Shin et al., ICCV 2021) trains two classifiers on one backbone to disagree; the pixels
where their argmax differs form the inconsistency mask, the pixels the model is unsure of.
- ``spl`` (segment-based pixel labelling) asks for every pixel of the mask (with a budget, for
  a uniform draw of them, kept apart).
- ``ppl`` (point-based pixel labelling) asks for a few representative points of it: the mask's
  pixels are grouped by the class the two classifiers predict on average; per group the
  prototype is the mean probability vector, and the group's points are its pixels nearest to
  that prototype. The budget is shared among the groups by their size, at least one point
  each, and the points of one group keep a distance of about half the spacing the group's
  area allows between them, so they do not fall on neighbouring pixels.
- ``random`` asks for uniformly random pixels of the whole image, ``entropy`` for the pixels
  of highest predictive entropy (with the same spacing): the label-efficient baselines.

Everything here works on one image's probabilities (C, H, W) at the label's resolution and
returns the chosen pixels as (y, x) rows; pixels in `taken` (already labelled) are never chosen.
"""

from __future__ import annotations

import math

import numpy as np

STRATEGIES = ("ppl", "spl", "random", "entropy")
NEEDS_SELECTOR = ("ppl", "spl")  # the strategies that need LabOR's second classifier


def inconsistency_mask(probs_a: np.ndarray, probs_b: np.ndarray) -> np.ndarray:
    """(H, W) bool: where the two classifiers' argmax classes differ."""
    return probs_a.argmax(axis=0) != probs_b.argmax(axis=0)


def entropy_map(probs: np.ndarray) -> np.ndarray:
    """(H, W) predictive entropy -Σ_c p log p."""
    return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=0)


def spaced_pick(
    ys: np.ndarray, xs: np.ndarray, scores: np.ndarray, count: int, radius: int, shape
) -> np.ndarray:
    """Up to `count` of the candidates (ys, xs), lowest score first, none within `radius`
    pixels (Chebyshev distance) of one picked before; (K, 2) int rows of (y, x)."""
    if count <= 0 or ys.size == 0:
        return np.zeros((0, 2), np.int64)
    order = np.argsort(scores, kind="stable")
    if radius <= 0:
        chosen = order[:count]
        return np.stack([ys[chosen], xs[chosen]], axis=1).astype(np.int64)
    blocked = np.zeros(shape, bool)
    picked: list[tuple[int, int]] = []
    for i in order:
        y, x = int(ys[i]), int(xs[i])
        if blocked[y, x]:
            continue
        picked.append((y, x))
        if len(picked) == count:
            break
        blocked[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = True
    return np.asarray(picked, np.int64).reshape(-1, 2)


def spacing(area: int, count: int) -> int:
    """Half the side of the square each of `count` points would own in `area` pixels."""
    return int(math.sqrt(area / max(count, 1)) / 2)


def share_budget(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Points per group: proportional to `sizes`, at least one each while the budget lasts
    (the largest groups first), summing to min(budget, sum of sizes)."""
    sizes = np.asarray(sizes, np.int64)
    total = int(min(budget, sizes.sum()))
    counts = np.zeros(sizes.size, np.int64)
    if total == 0:
        return counts
    order = np.argsort(-sizes, kind="stable")
    ones = order[: min(total, sizes.size)]
    counts[ones] = 1
    left = total - counts.sum()
    if left > 0:
        room = sizes - counts
        extra = np.floor(left * room / max(room.sum(), 1)).astype(np.int64)
        counts += np.minimum(extra, room)
        for i in order:  # the remainder, largest groups first
            if counts.sum() >= total:
                break
            if counts[i] < sizes[i]:
                counts[i] += 1
    return counts


def prototype_points(
    probs: np.ndarray, mask: np.ndarray, budget: int, taken: np.ndarray
) -> np.ndarray:
    """PPL: per predicted class of the masked pixels, those nearest the class prototype."""
    region = mask & ~taken
    ys, xs = np.nonzero(region)
    if ys.size == 0 or budget <= 0:
        return np.zeros((0, 2), np.int64)
    vectors = probs[:, ys, xs]  # (C, K)
    predicted = vectors.argmax(axis=0)
    classes, sizes = np.unique(predicted, return_counts=True)
    counts = share_budget(sizes, budget)
    chosen = []
    for c, size, count in zip(classes, sizes, counts, strict=True):
        members = predicted == c
        group = vectors[:, members]
        distance = np.linalg.norm(group - group.mean(axis=1, keepdims=True), axis=0)
        radius = spacing(int(size), int(count))
        chosen.append(
            spaced_pick(ys[members], xs[members], distance, int(count), radius, mask.shape)
        )
    return np.concatenate(chosen, axis=0)


def segment_pixels(
    mask: np.ndarray, budget: int | None, taken: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """SPL: every pixel of the mask not yet labelled; when a budget caps it, up to `budget` of
    them drawn uniformly, spaced as PPL spaces its points and never neighbours.

    A uniform draw stands for the whole mask, as the paper labels it. The pixels where the two
    classifiers' probabilities differ most were the first rule: they crowd onto a few classes
    (road and car), and trained 1.2 mIoU below the uniform draw over 3 seeds of the synthetic
    benchmark (bench/results/label_efficient.md, notes).
    The spacing matters: the mask runs along object edges, and training reads the labels at a
    coarser size than they are asked at (half, on the synthetic benchmark and on Cityscapes),
    where neighbours fall on one cell and all but one of their labels is lost.
    """
    ys, xs = np.nonzero(mask & ~taken)
    if budget is None or ys.size <= budget:
        return np.stack([ys, xs], axis=1).astype(np.int64)
    radius = max(1, spacing(ys.size, budget))
    return spaced_pick(ys, xs, rng.random(ys.size), budget, radius, mask.shape)


def random_pixels(shape, budget: int, taken: np.ndarray, rng) -> np.ndarray:
    """`budget` uniformly random pixels of the image that are not labelled yet."""
    free = np.flatnonzero(~taken.reshape(-1))
    count = min(budget, free.size)
    picked = np.sort(rng.choice(free, count, replace=False)) if count else free[:0]
    return np.stack(np.unravel_index(picked, shape), axis=1).astype(np.int64)


def entropy_pixels(probs: np.ndarray, budget: int, taken: np.ndarray) -> np.ndarray:
    """The `budget` free pixels of highest entropy, spaced as PPL spaces its points."""
    ys, xs = np.nonzero(~taken)
    scores = -entropy_map(probs)[ys, xs]  # lowest score first: highest entropy
    return spaced_pick(ys, xs, scores, budget, spacing(ys.size, budget), taken.shape)


def select_pixels(
    strategy: str,
    probs: np.ndarray,
    selector_probs: np.ndarray | None,
    budget: int | None,
    taken: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """The pixels `strategy` asks for in one image: (K, 2) rows of (y, x).

    `probs` (C, H, W) are the model's, `selector_probs` the second classifier's (ppl and spl
    only); `budget` is the number of pixels (None: spl's whole mask); `taken` (H, W) bool marks
    the pixels labelled before, never chosen again.
    """
    if strategy in NEEDS_SELECTOR:
        if selector_probs is None:
            raise ValueError(f"strategy {strategy} needs the second classifier's probabilities")
        mask = inconsistency_mask(probs, selector_probs)
        if strategy == "spl":
            return segment_pixels(mask, budget, taken, rng)
        mean = (probs + selector_probs) / 2
        return prototype_points(mean, mask, _need(budget, strategy), taken)
    if strategy == "random":
        return random_pixels(taken.shape, _need(budget, strategy), taken, rng)
    if strategy == "entropy":
        return entropy_pixels(probs, _need(budget, strategy), taken)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def _need(budget: int | None, strategy: str) -> int:
    if budget is None:
        raise ValueError(f"strategy {strategy} needs a budget (pixels per image)")
    return budget

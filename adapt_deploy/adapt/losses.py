"""The losses of the adaptation methods (DESIGN.md §1), as pure functions.

Numerics follow the official code: weak-da-seg (WDA: weak-label, point, category-wise and
output-space adversarial losses), AdaptSegNet (output-space adversarial) and ADVENT (entropy).
Domain labels are the official ones: source 0, target 1.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from adapt_deploy.adapt import data_parallel
from adapt_deploy.labels import IGNORE_INDEX

SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0
# The official code clamps probabilities to [EPS, 1 - EPS] before taking logs (and for LS-GAN).
EPS = 1e-7

GanMode = Literal["bce", "lsgan"]


def pixel_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """`total` (a sum over `count` pixels) over the count: this process's, or while N processes
    train the mean count per process (adapt/data_parallel.py); zero when there is no pixel."""
    shared = data_parallel.mean_count(count)
    if shared is None:
        return total / count.clamp(min=1)
    return total / shared.clamp(min=1e-12).to(total.dtype)


def _cross_entropy_mean(up: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled pixels, 255 ignored: torch's own mean for one process
    (its numbers unchanged), the sum over the shared count under data-parallel training."""
    if not data_parallel.active():
        return F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return pixel_mean(total, (labels != IGNORE_INDEX).sum())


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32 when it is fp16 or bf16 (autocast outputs); fp32 and fp64 unchanged. Every
    loss takes its inputs through this: mixed-precision training computes its losses in fp32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def upsample(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear upsampling with align_corners=True, as the field does; a no-op at equal size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (N, C, h, w) upsampled to labels (N, H, W); 255 ignored."""
    up = upsample(at_least_fp32(logits), labels.shape[-2:])
    return _cross_entropy_mean(up, labels)


def class_masked_segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy as segmentation_loss, each image over the classes its source labels only:
    `classes` (N, C) bool. The other classes' logits leave the softmax (so the model is not
    taught that they never occur: they get no gradient from this image) and any pixel labelled
    with one of them is ignored."""
    up = upsample(at_least_fp32(logits), labels.shape[-2:])
    keep = classes.to(torch.bool)[:, :, None, None]
    up = up.masked_fill(~keep, float("-inf"))
    safe = torch.where(labels == IGNORE_INDEX, 0, labels)
    labelled = torch.gather(keep.expand(-1, -1, *labels.shape[-2:]), 1, safe[:, None])[:, 0]
    labels = torch.where(labelled & (labels != IGNORE_INDEX), labels, IGNORE_INDEX)
    return _cross_entropy_mean(up, labels)


def pseudo_label_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy against pseudo-labels (N, H, W), 255 ignored, each pixel weighted by
    `weights` (N, H, W) when given; the sum over labelled pixels divided by their count (all
    pixels when weighted, as DACS averages the weighted loss over the image). A batch without a
    labelled pixel gives a zero that keeps the graph (cross_entropy alone would give NaN)."""
    up = upsample(at_least_fp32(logits), labels.shape[-2:])
    per_pixel = F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX, reduction="none")
    if weights is not None:
        return (per_pixel * weights).mean()
    return pixel_mean(per_pixel.sum(), (labels != IGNORE_INDEX).sum())


def soft_label_loss(logits: torch.Tensor, soft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-Σ_c soft_c log p_c averaged over the pixels of `mask` (N, H, W); `soft` (N, C, H, W)
    at the mask's size. Zero, graph kept, when the mask is empty."""
    log_p = F.log_softmax(upsample(at_least_fp32(logits), mask.shape[-2:]), dim=1)
    per_pixel = -(soft * log_p).sum(dim=1)
    return pixel_mean((per_pixel * mask).sum(), mask.sum())


def uniform_kl_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CRST's MRKLD regulariser: KL(uniform || p) up to a constant, -(1/C) Σ_c log p_c,
    averaged over the pixels of `mask` (N, H, W): it keeps the pseudo-labelled predictions from
    becoming over-confident."""
    log_p = F.log_softmax(upsample(at_least_fp32(logits), mask.shape[-2:]), dim=1)
    per_pixel = -log_p.mean(dim=1)
    return pixel_mean((per_pixel * mask).sum(), mask.sum())


def weak_label_loss(lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 2: mean BCE of p = clamp(sigmoid(lse), EPS, 1 - EPS) against image labels y (N, C).

    Takes the LSE-pooled logits before the sigmoid (``lse_pool`` output) and applies the
    official numerics inside: the clamp bounds the loss at extreme logits (and zeroes its
    gradient there, as in weak-da-seg's ``get_prediction``).
    """
    p = torch.sigmoid(at_least_fp32(lse)).clamp(EPS, 1.0 - EPS)
    y = targets.to(p.dtype)
    return -(y * torch.log(p) + (1.0 - y) * torch.log(1.0 - p)).mean()


def point_loss(
    logits: torch.Tensor, points: torch.Tensor, present: torch.Tensor | None = None
) -> torch.Tensor:
    """Point supervision: mean over labelled points of -log softmax(O) at the point's class.

    ``points`` is a label map (N, H, W) at the input size holding the class at each labelled
    pixel and 255 elsewhere; ``logits`` are upsampled to it (bilinear, align_corners=True) when
    smaller. The official code averages over points (not a sum) and skips points whose class is
    absent from the image's weak labels: pass those as ``present`` (N, C) to do the same.
    Returns a zero that keeps the graph when no point is left (the official code would fail).
    """
    labels = points.long()
    mask = labels != IGNORE_INDEX
    if present is not None:
        safe = torch.where(mask, labels, 0)
        mask &= torch.gather(present > 0, 1, safe.flatten(1)).view_as(mask)
    shared = data_parallel.mean_count(mask.sum())  # before any branch: a collective
    if not bool(mask.any()):
        return logits.sum() * 0.0
    up = upsample(at_least_fp32(logits), labels.shape[-2:])
    picked = up.permute(0, 2, 3, 1)[mask]  # (K, C): only the labelled pixels
    if shared is None:
        return F.cross_entropy(picked, labels[mask])
    return F.cross_entropy(picked, labels[mask], reduction="sum") / shared.to(picked.dtype)


def adversarial_loss(d_out: torch.Tensor, label: float, mode: GanMode = "bce") -> torch.Tensor:
    """Output-space adversarial loss of discriminator logits against a constant domain label.

    ``bce``: BCE-with-logits against ``label`` (source 0, target 1), as AdaptSegNet and WDA.
    ``lsgan``: WDA's LS-GAN, 0.5 * mean((clamp(sigmoid(d), EPS, 1 - EPS) - (1 - label))²): the
    official code regresses sigmoid(D) to 1 for source and 0 for target, the mirror of the BCE
    convention; the game is the same. The generator calls it on target outputs with label 0;
    the discriminator's loss is :func:`discriminator_loss`.
    """
    d_out = at_least_fp32(d_out)
    if mode == "bce":
        return F.binary_cross_entropy_with_logits(d_out, torch.full_like(d_out, label))
    if mode == "lsgan":
        s = torch.sigmoid(d_out).clamp(EPS, 1.0 - EPS)
        return 0.5 * ((s - (1.0 - label)) ** 2).mean()
    raise ValueError(f"unknown GAN mode {mode!r}; expected 'bce' or 'lsgan'")


def discriminator_loss(
    d_source: torch.Tensor, d_target: torch.Tensor, mode: GanMode = "bce"
) -> torch.Tensor:
    """The output-space discriminator's loss: half source (label 0) plus half target (label 1)."""
    return 0.5 * (
        adversarial_loss(d_source, SOURCE_LABEL, mode)
        + adversarial_loss(d_target, TARGET_LABEL, mode)
    )


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """ADVENT MinEnt: mean over pixels of -Σ_c p log p / log C, p = softmax over dim 1.

    ADVENT applies it to the logits upsampled to the input size; pass those to match it.
    Uniform predictions give 1, one-hot predictions 0.
    """
    log_p = F.log_softmax(at_least_fp32(logits), dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    return entropy.mean() / math.log(logits.shape[1])


def weighted_self_information(probs: torch.Tensor) -> torch.Tensor:
    """ADVENT's ``prob_2_entropy``: -p log2(p + 1e-30) / log2 C per class and pixel (N, C, H, W).

    The input of ADVENT's adversarial-entropy discriminator; it sums over C to the normalized
    entropy map.
    """
    probs = at_least_fp32(probs)
    return -probs * torch.log2(probs + 1e-30) / math.log2(probs.shape[1])


def _category_term(
    d_out: torch.Tensor, present: torch.Tensor, label: float, mode: GanMode
) -> torch.Tensor:
    """Official ``get_adv_loss``: per image the mean over present classes, then the mean over
    the images with at least one present class; zero (in the graph) when none has any."""
    if d_out.shape != present.shape:
        raise ValueError(
            f"discriminator logits {tuple(d_out.shape)} and labels {tuple(present.shape)} differ"
        )
    d_out = at_least_fp32(d_out)
    if mode == "bce":
        per_class = F.binary_cross_entropy_with_logits(
            d_out, torch.full_like(d_out, label), reduction="none"
        )
    elif mode == "lsgan":
        per_class = 0.5 * (torch.sigmoid(d_out).clamp(EPS, 1.0 - EPS) - (1.0 - label)) ** 2
    else:
        raise ValueError(f"unknown GAN mode {mode!r}; expected 'bce' or 'lsgan'")
    mask = present > 0
    # where(), not a product: absent classes get exactly zero gradient whatever their logits.
    summed = torch.where(mask, per_class, torch.zeros_like(per_class)).sum(dim=1)
    count = mask.sum(dim=1)
    per_image = summed / count.clamp(min=1).to(summed.dtype)
    has_any = count > 0
    total = torch.where(has_any, per_image, torch.zeros_like(per_image)).sum()
    return pixel_mean(total, has_any.sum().to(total.dtype))


def category_discriminator_loss(
    d_source: torch.Tensor,
    d_target: torch.Tensor,
    y_source: torch.Tensor,
    y_target: torch.Tensor,
    mode: GanMode = "bce",
) -> torch.Tensor:
    """Eq. 4: the category discriminators' loss over present classes only.

    Logits (N, C) of the discriminators on detached pooled source/target features; labels y
    (N, C) mark the present classes (source: from its GT, target: weak or pseudo-weak). Each
    domain term averages as the official code does (see :func:`_category_term`) and, like its
    two backward passes of loss / 2, the result is half source (label 0) + half target (label 1).
    """
    return 0.5 * (
        _category_term(d_source, y_source, SOURCE_LABEL, mode)
        + _category_term(d_target, y_target, TARGET_LABEL, mode)
    )


def category_adversarial_loss(
    d_target: torch.Tensor, y_target: torch.Tensor, mode: GanMode = "bce"
) -> torch.Tensor:
    """Eq. 5: the generator's loss making present target classes look source (label 0)."""
    return _category_term(d_target, y_target, SOURCE_LABEL, mode)

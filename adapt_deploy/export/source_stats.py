"""Source statistics for on-device adaptation, computed once at export on labelled source data.

The exported `presence` (sigmoid of LSE pooling, Eq. 1) is not calibrated: at the paper's global
T = 0.2 nearly every class is "present" in every image, so the pseudo-weak labels [p_c > T]
(Eq. 7) carry little information. Here each class gets the threshold that maximizes the F1 of
[p_c > t] against ground-truth presence on the source. It is found on the LSE value before the
sigmoid (`lse_thresholds`): the float32 sigmoid is exactly 1.0 for inputs above about 16.6, so
no cut on p_c can separate classes scored higher (how often confident classes score that high
is not measured by any benchmark here). `thresholds` is the same cut as a presence value, for
reading.
Plus the reference numbers an adapter needs to notice drift: class prototypes (attention
pooling, Eq. 3), prediction entropy, how many classes are called present and predicted per image,
and what home looks like to the condition bank (`tta.bank`): the mean signature of the source
images and the radius around it that holds 99% of them.
"""

from __future__ import annotations

import io
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from adapt_deploy.config import ExperimentConfig
from adapt_deploy.data.normalize import normalize
from adapt_deploy.errors import UserError
from adapt_deploy.labels import IGNORE_INDEX
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.models.signature import SignatureProbe
from adapt_deploy.ops.pooling import attention_pool, lse_pool
from adapt_deploy.progress import Reporter

HOME_QUANTILE = 0.99  # the home radius holds this share of the source images' signatures

MIN_SHARE = 0.001  # a class is present in an image when it covers >= 0.1% of its labelled pixels
BATCH_SIZE = 4


@dataclass
class SourceStats:
    """Per-class calibration and reference statistics of a model on its source data.

    Arrays are float32 unless noted; C classes, D feature channels. Metrics that are undefined
    (no positives, or no predictions) are NaN. `thresholds` are 1.0 for `never_present` classes
    (p > 1 never holds: such a class is never pseudo-labelled present); `prototypes` are zero
    where `prototype_counts` is 0.
    """

    thresholds: np.ndarray  # (C,) calibrated threshold on p_c, F1-optimal on the source
    lse_thresholds: np.ndarray  # (C,) the same on the LSE value (the cut used); +inf: never
    f1: np.ndarray  # (C,) at `thresholds`
    precision: np.ndarray  # (C,)
    recall: np.ndarray  # (C,)
    f1_at_t: np.ndarray  # (C,) at the global threshold T
    precision_at_t: np.ndarray  # (C,)
    recall_at_t: np.ndarray  # (C,)
    never_present: np.ndarray  # (C,) bool: not present in any image of the sample
    prototypes: np.ndarray  # (C, D) mean attention-pooled features over GT-present images
    prototype_counts: np.ndarray  # (C,) int64: images behind each prototype
    class_share: np.ndarray  # (C,) mean share of argmax pixels per image
    entropy: float  # mean normalized (by log C) pixel entropy of softmax(logits)
    entropy_std: float  # standard deviation of the per-image means
    present_classes: float  # mean classes per image with p_c > calibrated threshold
    present_classes_at_t: float  # mean classes per image with p_c > T
    gt_classes: float  # mean classes per image present in the ground truth
    predicted_classes: float  # mean classes per image whose argmax share >= 0.1%
    global_threshold: float  # T the *_at_t metrics use (config.adapt.pseudo_threshold)
    lse_k: float  # k of the LSE pooling the thresholds apply to
    images: int
    source: str  # the dataset root
    # (2·stem channels,) mean frame signature of the images; empty in packages written before
    # the condition bank (then no frame is recognised as home)
    home_signature: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    home_radius: float = float("nan")  # HOME_QUANTILE of the images' distances to it

    @property
    def num_classes(self) -> int:
        return int(self.thresholds.shape[0])

    def summary(self) -> dict[str, Any]:
        """Small JSON-able scalars (means over the classes present in the sample)."""
        seen = ~self.never_present

        def mean(values: np.ndarray) -> float | None:
            picked = values[seen]
            return _round(float(np.nanmean(picked))) if np.isfinite(picked).any() else None

        return {
            "images": self.images,
            "entropy": _round(self.entropy),
            "entropy_std": _round(self.entropy_std),
            "present_classes": _round(self.present_classes),
            "present_classes_at_t": _round(self.present_classes_at_t),
            "gt_classes": _round(self.gt_classes),
            "predicted_classes": _round(self.predicted_classes),
            "mean_f1": mean(self.f1),
            "mean_precision": mean(self.precision),
            "mean_recall": mean(self.recall),
            "global_threshold": self.global_threshold,
            "mean_f1_at_t": mean(self.f1_at_t),
            "mean_precision_at_t": mean(self.precision_at_t),
            "mean_recall_at_t": mean(self.recall_at_t),
            "never_present": [int(c) for c in np.flatnonzero(self.never_present)],
            "lse_k": self.lse_k,
            "home_radius": _round(self.home_radius),
        }

    def to_bytes(self) -> bytes:
        """The .npz bytes (plain arrays and 0-d scalars only: loads with allow_pickle=False)."""
        buffer = io.BytesIO()
        np.savez(buffer, **{f.name: np.asarray(getattr(self, f.name)) for f in fields(self)})
        return buffer.getvalue()

    @classmethod
    def load(cls, path: Path) -> SourceStats:
        """Read what `to_bytes` wrote (`package.write_package` stores it); UserError naming the
        file when it is not such a file."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {
                    f.name: data[f.name]
                    for f in fields(cls)
                    if f.name in data or (f.default is MISSING and f.default_factory is MISSING)
                }
        except (OSError, KeyError, ValueError) as exc:
            raise UserError(f"{path}: not a source statistics file ({exc})") from None
        scalars = {
            "entropy": float,
            "entropy_std": float,
            "present_classes": float,
            "present_classes_at_t": float,
            "gt_classes": float,
            "predicted_classes": float,
            "global_threshold": float,
            "lse_k": float,
            "images": int,
            "source": str,
            "home_radius": float,
        }
        values: dict[str, Any] = {
            k: kind(arrays[k].item()) for k, kind in scalars.items() if k in arrays
        }
        if "home_signature" in arrays:
            values["home_signature"] = arrays["home_signature"].astype(np.float32)
        per_class = [f.name for f in fields(cls) if f.name not in {*scalars, "home_signature"}]
        for name in per_class:
            values[name] = arrays[name]
        stats = cls(**values)
        count = stats.num_classes
        bad = [n for n in per_class if values[n].shape[:1] != (count,)]
        if bad or stats.prototypes.ndim != 2:
            raise UserError(f"{path}: inconsistent source statistics (shapes of {bad})")
        return stats


def _round(value: float, digits: int = 4) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def presence_metrics(
    predicted: np.ndarray, truth: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (F1, precision, recall) of (images, C) boolean predictions; NaN where the
    denominator is zero (F1 = 2TP / (2TP + FP + FN))."""
    tp = (predicted & truth).sum(0).astype(np.float64)
    fp = (predicted & ~truth).sum(0).astype(np.float64)
    fn = (~predicted & truth).sum(0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
    return f1.astype(np.float32), precision.astype(np.float32), recall.astype(np.float32)


def best_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The threshold t maximizing F1 of [scores > t] against boolean `truth` (real scores).

    Every distinct cut of the sorted scores is tried; t is the midpoint between the highest
    score left out and the lowest one kept (1 below the lowest score when all are kept). Ties
    go to the higher threshold (fewer, surer pseudo-labels). No positive at all: +inf, nothing
    is ever present.
    """
    scores = np.asarray(scores, np.float64)
    truth = np.asarray(truth, bool)
    positives = int(truth.sum())
    if positives == 0:
        return math.inf
    values = np.unique(scores)  # ascending; cut i keeps the scores >= values[i]
    kept = len(scores) - np.searchsorted(np.sort(scores), values, side="left")
    hits = positives - np.searchsorted(np.sort(scores[truth]), values, side="left")
    f1 = 2 * hits / (kept + positives)
    best = len(values) - 1 - int(np.argmax(f1[::-1]))  # the highest cut among equals
    high = float(values[best])
    return (float(values[best - 1]) + high) / 2 if best > 0 else high - 1.0


# --------------------------------------------------------------------------------------------
# The pass over the source
# --------------------------------------------------------------------------------------------


def spaced_indices(length: int, count: int) -> list[int]:
    """`count` indices evenly spaced over range(length), first and last included."""
    if length <= count:
        return list(range(length))
    return np.unique(np.linspace(0, length - 1, count).round().astype(int)).tolist()


@torch.inference_mode()
def compute_source_stats(
    model: DeepLab,
    config: ExperimentConfig,
    dataset: Dataset,
    max_images: int = 200,
    reporter: Reporter | None = None,
) -> SourceStats:
    """Run `model` (eval mode, no grad) over up to `max_images` evenly spaced labelled images
    of `dataset` (the source split `config.data.source` names, as `build_dataset` returns it:
    resized to the training size) and calibrate per-class presence thresholds."""
    reporter = reporter or Reporter()
    if max_images < 1:
        raise UserError(f"--adapt-images must be at least 1, got {max_images}")
    if len(dataset) == 0:
        raise UserError(f"the source data {config.data.source.root} has no images")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    num_classes, k = config.model.num_classes, config.adapt.lse_k
    subset = Subset(dataset, spaced_indices(len(dataset), max_images))
    loader = DataLoader(subset, batch_size=BATCH_SIZE, num_workers=0)
    scores, truth, entropies, predicted_shares, signatures = [], [], [], [], []
    probe = SignatureProbe(model.backbone.conv1, model.backbone.bn1)
    proto_sum = torch.zeros(num_classes, model.feature_dim, dtype=torch.float64)
    try:
        with reporter.task("source statistics for on-device adaptation", len(subset)):
            for batch in loader:
                x = normalize(batch["image"].to(device), config.input)
                signatures.append(probe(x))
                out = model(x)
                logits, features = out["logits"].float(), out["features"].float()
                scores.append(lse_pool(logits, k).double().cpu().numpy())
                present = _gt_presence(batch["label"], num_classes)
                truth.append(present.numpy())
                pooled = attention_pool(logits.detach(), features).cpu().double()  # (N, C, D)
                proto_sum += (pooled * present.unsqueeze(-1).double()).sum(0)
                log_probs = torch.log_softmax(logits, dim=1)
                pixel_entropy = -(log_probs.exp() * log_probs).sum(1)  # (N, h, w)
                entropies.append((pixel_entropy.mean((1, 2)) / math.log(num_classes)).cpu())
                argmax = F.one_hot(logits.argmax(1).flatten(1), num_classes)  # (N, h*w, C)
                predicted_shares.append(argmax.float().mean(1).cpu().numpy())
                reporter.advance(len(logits))
    finally:
        model.train(was_training)
    return _summarize(
        np.concatenate(scores),
        np.concatenate(truth),
        proto_sum,
        torch.cat(entropies).numpy(),
        np.concatenate(predicted_shares),
        config.adapt.pseudo_threshold,
        k,
        config.data.source.root,
        torch.cat(signatures),
    )


def _gt_presence(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C) bool: classes covering >= MIN_SHARE of each label's non-ignored pixels."""
    flat = labels.flatten(1).long()
    valid = flat != IGNORE_INDEX
    ids = torch.where(valid, flat, torch.full_like(flat, num_classes))
    counts = torch.zeros(len(flat), num_classes + 1, dtype=torch.int64)
    counts.scatter_add_(1, ids, torch.ones_like(ids))
    total = valid.sum(1, keepdim=True).clamp_min(1)
    return (counts[:, :num_classes] / total >= MIN_SHARE) & (valid.sum(1, keepdim=True) > 0)


def _summarize(
    scores: np.ndarray,
    truth: np.ndarray,
    proto_sum: torch.Tensor,
    entropies: np.ndarray,
    shares: np.ndarray,
    global_threshold: float,
    lse_k: float,
    source: str,
    signatures: torch.Tensor,
) -> SourceStats:
    num_classes = scores.shape[1]
    lse_thresholds = np.array(
        [best_threshold(scores[:, c], truth[:, c]) for c in range(num_classes)], np.float64
    )
    with np.errstate(over="ignore"):
        thresholds = (1.0 / (1.0 + np.exp(-lse_thresholds))).astype(np.float32)
    calibrated = scores > lse_thresholds
    f1, precision, recall = presence_metrics(calibrated, truth)
    at_t = scores > math.log(global_threshold / (1.0 - global_threshold))
    f1_t, precision_t, recall_t = presence_metrics(at_t, truth)
    counts = truth.sum(0).astype(np.int64)
    prototypes = (proto_sum / torch.from_numpy(np.maximum(counts, 1))[:, None]).float().numpy()
    home = signatures.mean(0)
    spread = (signatures - home).pow(2).mean(1).sqrt()
    return SourceStats(
        thresholds=thresholds,
        lse_thresholds=lse_thresholds.astype(np.float32),
        f1=f1,
        precision=precision,
        recall=recall,
        f1_at_t=f1_t,
        precision_at_t=precision_t,
        recall_at_t=recall_t,
        never_present=counts == 0,
        prototypes=prototypes,
        prototype_counts=counts,
        class_share=shares.mean(0).astype(np.float32),
        entropy=float(entropies.mean()),
        entropy_std=float(entropies.std()),
        present_classes=float(calibrated.sum(1).mean()),
        present_classes_at_t=float(at_t.sum(1).mean()),
        gt_classes=float(truth.sum(1).mean()),
        predicted_classes=float((shares >= MIN_SHARE).sum(1).mean()),
        global_threshold=float(global_threshold),
        lse_k=float(lse_k),
        images=len(scores),
        source=source,
        home_signature=home.numpy().astype(np.float32),
        home_radius=float(spread.quantile(HOME_QUANTILE)),
    )

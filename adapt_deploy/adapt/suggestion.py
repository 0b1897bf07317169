"""A labelling round over a split: the model (and LabOR's pixel selector) predict each image,
a strategy picks the pixels to ask for, and the round directory records them
(data/annotation.py holds the format). Used by `adapt-deploy suggest-points` and by the labor_*
methods' rounds during training; resumable image by image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapt_deploy.adapt.losses import at_least_fp32, upsample
from adapt_deploy.adapt.point_selection import NEEDS_SELECTOR, STRATEGIES, select_pixels
from adapt_deploy.adapt.pseudo_labelling import checkpoint_on_split, samples_of
from adapt_deploy.bundle.meta import sha256_file
from adapt_deploy.config import DatasetConfig, InputConfig
from adapt_deploy.data import annotation
from adapt_deploy.data.datasets import build_dataset
from adapt_deploy.data.normalize import normalize
from adapt_deploy.data.segmentation import image_size, read_image
from adapt_deploy.data.weak import load_points, point_set_path
from adapt_deploy.errors import UserError
from adapt_deploy.models.checkpoints import read_checkpoint
from adapt_deploy.models.deeplab import ASPPClassifier, DeepLab
from adapt_deploy.progress import Reporter

SELECTOR = "selector"  # LabOR's second classifier: its name among a checkpoint's "heads"
DEFAULT_BUDGET = 40  # points per image for ppl, random and entropy (LabOR's PPL)


@dataclass
class SuggestionJob:
    """What one round asks: the network, its selector, the split, the strategy and budget."""

    network: DeepLab
    selector: nn.Module | None  # LabOR's second classifier over the network's features
    dataset: torch.utils.data.Dataset  # the split's images, resized as the network trained
    input: InputConfig
    strategy: str
    budget: int | None  # pixels per image; None: spl's whole mask
    seed: int
    taken: dict[str, np.ndarray]  # per image, (K, 2) rows of (y, x) labelled before
    overlays: bool = True


def default_budget(strategy: str, budget: int | None) -> int | None:
    """`budget`, or the strategy's default: 40 points, or spl's whole mask."""
    if budget is not None:
        return budget
    return None if strategy == "spl" else DEFAULT_BUDGET


@torch.no_grad()
def probabilities(
    network: nn.Module, selector: nn.Module | None, image: torch.Tensor, cfg: InputConfig, size
) -> tuple[np.ndarray, np.ndarray | None]:
    """Softmax (C, H, W) of the network, and of the selector when given, at `size`."""
    out = network(normalize(image, cfg))
    heads = [out["logits"]] + ([selector(out["features"])] if selector is not None else [])
    maps = [F.softmax(upsample(at_least_fp32(h), size), dim=1)[0].cpu().numpy() for h in heads]
    return maps[0], (maps[1] if selector is not None else None)


def suggest(job: SuggestionJob, round_dir: Path, reporter: Reporter) -> dict[str, Any]:
    """Suggest the pixels of every image of the split into `round_dir` (its round.json must be
    written: annotation.start_round); images suggested before are kept. Returns the summary."""
    base = samples_of(job.dataset)
    names = [s.name for s in base.samples]
    device = next(job.network.parameters()).device
    modules = [job.network] + ([job.selector] if job.selector is not None else [])
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        with reporter.task(f"suggesting pixels ({job.strategy})", len(names)):
            for index, sample in enumerate(base.samples):
                if annotation.read_suggestion(round_dir, sample.name) is None:
                    _suggest_image(job, round_dir, index, sample, device)
                reporter.advance()
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
    return annotation.finish_round(round_dir, names)


def _suggest_image(job: SuggestionJob, round_dir: Path, index: int, sample, device) -> None:
    size = image_size(sample.image)
    image = job.dataset[index]["image"].unsqueeze(0).to(device)
    probs, selector_probs = probabilities(job.network, job.selector, image, job.input, size)
    taken = np.zeros(size, bool)
    earlier = job.taken.get(sample.name)
    if earlier is not None and len(earlier):
        taken[earlier[:, 0], earlier[:, 1]] = True
    rng = np.random.default_rng([job.seed, index])
    pixels = select_pixels(job.strategy, probs, selector_probs, job.budget, taken, rng)
    predicted = probs.argmax(axis=0)[pixels[:, 0], pixels[:, 1]]
    annotation.write_suggestion(round_dir, sample.name, size, pixels, predicted)
    if job.overlays:
        annotation.write_overlay(round_dir, sample.name, read_image(sample.image), pixels)


def points_as_pixels(points: dict[str, list[list[int]]]) -> dict[str, np.ndarray]:
    """A point set's {name: [[class, y, x]]} as {name: (K, 2) rows of (y, x)}."""
    return {name: np.asarray(p, np.int64).reshape(-1, 3)[:, 1:] for name, p in points.items()}


def selector_from_checkpoint(
    checkpoint: dict[str, Any], network: DeepLab, path: Path, strategy: str
) -> nn.Module:
    """LabOR's second classifier stored in a checkpoint; UserError when it has none."""
    heads = checkpoint.get("heads") or {}
    if SELECTOR not in heads:
        method = checkpoint["meta"].get("method", "?")
        raise UserError(
            f"--strategy {strategy} needs LabOR's pixel selector, but {path} (method {method}) "
            "has none: train a labor_* method first (labor.rounds=0 trains the selector without "
            "asking for labels), or use --strategy random or entropy"
        )
    arch = checkpoint["meta"]["architecture"]
    selector = ASPPClassifier(network.feature_dim, network.num_classes, arch["aspp_branches"])
    selector.load_state_dict(heads[SELECTOR])
    return selector.to(next(network.parameters()).device)


def suggest_checkpoint(
    checkpoint: Path,
    data: Path,
    out: Path,
    strategy: str,
    budget: int | None = None,
    kind: str = "cityscapes",
    split: str = "train",
    simulate: bool = False,
    exclude: str | None = None,
    seed: int = 0,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """`adapt-deploy suggest-points`: a labelling round of `split` by a checkpoint into `out`,
    with the answers from the split's ground truth when `simulate`. Returns the summary."""
    reporter = reporter or Reporter()
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if budget is not None and budget <= 0:
        raise UserError(f"--budget must be a positive number of pixels per image, got {budget}")
    budget = default_budget(strategy, budget)
    network, config, dataset = checkpoint_on_split(checkpoint, data, kind, split)
    selector = None
    if strategy in NEEDS_SELECTOR:
        selector = selector_from_checkpoint(
            read_checkpoint(checkpoint), network, checkpoint, strategy
        )
    taken: dict[str, np.ndarray] = {}
    if exclude:
        points, _ = load_points(point_set_path(data, split, annotation.check_set_name(exclude)))
        taken = points_as_pixels(points)
    record = {
        "strategy": strategy,
        "budget": budget,
        "seed": seed,
        "exclude": exclude,
        "checkpoint": sha256_file(Path(checkpoint)),
        "num_classes": config.model.num_classes,
        "data": {"root": str(Path(data).resolve()), "kind": kind, "split": split},
    }
    annotation.start_round(out, record)
    job = SuggestionJob(network, selector, dataset, config.input, strategy, budget, seed, taken)
    summary = suggest(job, out, reporter)
    if simulate:
        entry = DatasetConfig(kind, str(data), split, list(config.data.target.size))
        labelled = build_dataset(entry, labels=True, resize_labels=False)
        annotation.simulate_answers(out, labelled, [s.name for s in labelled.samples])
    return summary

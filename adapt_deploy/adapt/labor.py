"""LabOR (Shin et al., ICCV 2021): label only the target pixels the model is unsure about.

The pixel selector is the segmentation network plus a second classifier on its features. Both
classifiers learn from the source and from the labelled target pixels, and a weight-discrepancy
term (the cosine similarity of their weights, as CLAN) keeps them different, so that where
their predictions disagree marks what the model does not know. Training is AdaptSegNet's
(output-space adversarial alignment) plus cross-entropy on the labelled target pixels.

When BatchNorm trains, its running statistics come from the target passes only
(selftrain.bn_stats "target", adapt/target_statistics.py, as the self-training methods do), so
the selector and the saved model normalize target images as the target needs.

Labels arrive in labor.rounds rounds: after a warm-up (labor.warmup of train.iterations), each
round asks for pixels of every target train image by the method's strategy (adapt/
point_selection.py) and the simulated annotator answers from the ground truth. A round is a
labelling-round directory, RUN/labels/round_R, exactly as `adapt-deploy suggest-points
--simulate` writes one, and its answers are imported through the same checks as a human's.
With labor.rounds 0 nothing is asked during training: the labels are the point set
adapt.points (an annotator's imported answers), or none for a warm-up run that only trains the
selector for `suggest-points`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from adapt_deploy.adapt.adaptsegnet import AdaptSegNet
from adapt_deploy.adapt.base import Batch, Losses, RunContext
from adapt_deploy.adapt.losses import point_loss, segmentation_loss
from adapt_deploy.adapt.pseudo_labelling import samples_of
from adapt_deploy.adapt.suggestion import (
    SELECTOR,
    SuggestionJob,
    default_budget,
    points_as_pixels,
    suggest,
)
from adapt_deploy.adapt.target_statistics import TargetStatistics
from adapt_deploy.atomic import atomic_write_json
from adapt_deploy.data import annotation
from adapt_deploy.data.datasets import build_dataset
from adapt_deploy.data.weak import load_points, point_map, point_set_path, save_points
from adapt_deploy.models.checkpoints import load_weights_only
from adapt_deploy.models.deeplab import ASPPClassifier, DeepLab

LABELS_DIR = "labels"
POINTS_FILE = "points.json"  # every labelled target pixel so far (data/weak.py's format)
SUMMARY_FILE = "summary.json"  # the label cost: pixels asked and labelled per image


def round_starts(iterations: int, rounds: int, warmup: float) -> list[int]:
    """The iterations at which rounds ask for labels: after the warm-up, evenly spread."""
    first = int(warmup * iterations)
    return [first + r * (iterations - first) // rounds for r in range(rounds)]


def round_budget(budget: int | None, rounds: int, index: int) -> int | None:
    """Round `index`'s share of the budget (the remainder to the first rounds)."""
    if budget is None:
        return None
    return budget // rounds + (1 if index < budget % rounds else 0)


def weight_similarity(a: torch.nn.Module, b: torch.nn.Module) -> torch.Tensor:
    """Cosine similarity of two classifiers' flattened weights (CLAN's discrepancy loss)."""
    wa = torch.cat([p.flatten() for n, p in a.named_parameters() if n.endswith("weight")])
    wb = torch.cat([p.flatten() for n, p in b.named_parameters() if n.endswith("weight")])
    return F.cosine_similarity(wa, wb, dim=0)


class LabelOnlyIfRequired(TargetStatistics, AdaptSegNet):
    """LabOR with point-based pixel labelling: ~40 representative uncertain points per image."""

    name: ClassVar[str] = "labor_ppl"
    strategy: ClassVar[str] = "ppl"
    target_needs: ClassVar[str] = "images"

    def __init__(self, config, model: DeepLab, device) -> None:
        super().__init__(config, model, device)
        self.network = model  # the module itself (self.model may become a wrapper)
        generator = torch.Generator().manual_seed(config.train.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            selector = ASPPClassifier(
                model.feature_dim, model.num_classes, config.model.aspp_branches
            )
        self._restore_selector(selector)
        self.selector_module = self.add_head(SELECTOR, selector)  # heads[...] may be wrapped
        self.run: RunContext | None = None
        self.rounds_done = 0
        self.points: dict[str, list[list[int]]] = {}
        self.sizes: dict[str, list[int]] = {}

    def _restore_selector(self, selector: ASPPClassifier) -> None:
        """Continue the selector of model.init when that checkpoint holds one (a labor run)."""
        init = self.config.model.init
        if not init or self.config.model.init_format not in ("auto", "adapt_deploy"):
            return
        stored = load_weights_only(init, "checkpoint")
        if isinstance(stored, dict) and SELECTOR in (stored.get("heads") or {}):
            selector.load_state_dict(stored["heads"][SELECTOR])

    @property
    def selector(self) -> torch.nn.Module:
        return self.heads[SELECTOR]

    @property
    def budget(self) -> int | None:
        return default_budget(self.strategy, self.config.labor.budget)

    def labels_dir(self) -> Path:
        assert self.run is not None, "attach() first"
        return self.run.out / LABELS_DIR

    def attach(self, run: RunContext) -> None:
        if run.target is None:
            raise ValueError(f"{self.name} needs the target train split")
        self.run = run
        names = [s.name for s in samples_of(run.target).samples]
        self.points = {name: [] for name in names}
        entry = self.config.data.target
        if self.config.adapt.points:  # an annotator's imported answers
            path = point_set_path(entry.root, entry.split, self.config.adapt.points)
            points, sizes = load_points(path)
            self.points.update(points)
            self.sizes.update(sizes)

    def before_iteration(self, iteration: int) -> None:
        """Take every round whose start has come (a resumed run catches up from the files)."""
        lb = self.config.labor
        starts = round_starts(self.config.train.iterations, lb.rounds, lb.warmup)
        due = sum(1 for start in starts if start <= iteration)
        while self.rounds_done < due:
            self._take_round(self.rounds_done, iteration)
            self.rounds_done += 1

    def _take_round(self, index: int, iteration: int) -> None:
        run = self.run
        assert run is not None, "attach() first"
        folder = self.labels_dir() / f"round_{index + 1}"
        if run.primary:
            self._ask(index, iteration, folder)
        run.barrier()
        sizes = annotation.round_sizes(folder)
        answers, _ = annotation.read_answers(folder / annotation.ANSWERS_FILE, sizes)
        self.sizes.update({n: list(s) for n, s in sizes.items()})
        self.points = annotation.merge_points(self.points, answers)
        if run.primary:
            save_points(self.points, self.sizes, self.labels_dir() / POINTS_FILE)
            self._write_summary(index + 1)

    def _ask(self, index: int, iteration: int, folder: Path) -> None:
        """Rank 0: the round's suggestions with the model as it is, and the simulated answers
        (a complete round on disk, from before an interruption, is kept)."""
        run, lb = self.run, self.config.labor
        assert run is not None
        budget = round_budget(self.budget, lb.rounds, index)
        entry = self.config.data.target
        record = {
            "strategy": self.strategy,
            "budget": budget,
            "seed": self.config.train.seed + index,
            "exclude": "earlier rounds",
            "checkpoint": f"run {run.out.name}, round {index + 1}",
            "num_classes": self.config.model.num_classes,
            "data": {"root": str(Path(entry.root).resolve()), "kind": entry.kind,
                     "split": entry.split},
        }  # fmt: skip
        annotation.start_round(folder, record)
        if (folder / annotation.ANSWERS_FILE).is_file():
            return
        run.reporter.log(
            f"LabOR round {index + 1}/{lb.rounds} at iteration {iteration}: asking for "
            f"{'the inconsistency mask' if budget is None else f'{budget} pixels'} per image "
            f"({self.strategy}) -> {folder}"
        )
        taken = points_as_pixels(self.points) | self._asked_before(index)
        job = SuggestionJob(
            run.network, self.selector_module, run.target, self.config.input,
            self.strategy, budget, record["seed"], taken, overlays=False,
        )  # fmt: skip
        suggest(job, folder, run.reporter)
        labelled = build_dataset(entry, labels=True, resize_labels=False)
        annotation.simulate_answers(folder, labelled, list(self.points))

    def _asked_before(self, index: int) -> dict[str, np.ndarray]:
        """Pixels asked in earlier rounds, void answers included: never asked again."""
        asked: dict[str, list[np.ndarray]] = {}
        for r in range(index):
            folder = self.labels_dir() / f"round_{r + 1}"
            for name in self.points:
                record = annotation.read_suggestion(folder, name)
                if record is not None and record["pixels"]:
                    xy = np.asarray(record["pixels"], np.int64)
                    asked.setdefault(name, []).append(xy[:, ::-1])
        return {n: np.concatenate(v) for n, v in asked.items()}

    def _write_summary(self, rounds: int) -> None:
        """The label cost so far: pixels asked per image (what an annotator is paid for) and
        pixels labelled with a class, over all rounds."""
        asked = 0
        for r in range(rounds):
            summary_path = self.labels_dir() / f"round_{r + 1}" / annotation.SUMMARY_FILE
            asked += json.loads(summary_path.read_text())["pixels"]
        images = max(len(self.points), 1)
        labelled = sum(len(p) for p in self.points.values())
        atomic_write_json(
            self.labels_dir() / SUMMARY_FILE,
            {
                "strategy": self.strategy,
                "rounds": rounds,
                "images": len(self.points),
                "asked_per_image": asked / images,
                "labelled_per_image": labelled / images,
            },
        )

    def source_losses(self, batch: Batch) -> Losses:
        with self.source_pass():  # BN's running statistics stay the target's
            out = self.model(self.input(batch))
        labels = batch["label"].to(self.device)
        self._remember_source(out, batch, labels)
        seg = segmentation_loss(out["logits"], labels)
        seg_selector = segmentation_loss(self.selector(out["features"]), labels)
        lambda_dis = self.config.labor.lambda_dis
        return {
            "seg": self.source_weight() * (seg + seg_selector),
            "dis": lambda_dis * weight_similarity(self.network.head, self.selector),
        }

    def source_weight(self) -> float:
        """The source cross-entropy's weight: 1 until the first target labels exist (the
        selector learns from the source what its first round needs), labor.lambda_source after."""
        labelled = self.rounds_done > 0 or bool(self.config.adapt.points)
        return self.config.labor.lambda_source if labelled else 1.0

    def label_map(self, name: str, size: tuple[int, int]) -> torch.Tensor:
        """(H, W) the image's labelled pixels at the batch's size, 255 elsewhere."""
        return point_map(self.points.get(name, []), self.sizes.get(name, [1, 1]), size)

    def target_losses(self, batch: Batch) -> Losses:
        out = self.model(self.input(batch))
        losses = self.adversarial(out["logits"], batch)
        size = tuple(batch["image"].shape[-2:])
        labels = torch.stack([self.label_map(name, size) for name in batch["name"]])
        labels = labels.to(self.device)
        selector_logits = self.selector(out["features"])
        both = point_loss(out["logits"], labels) + point_loss(selector_logits, labels)
        losses["target_ce"] = self.config.labor.lambda_target * both
        return losses


class SegmentPixelLabelling(LabelOnlyIfRequired):
    """LabOR with segment-based pixel labelling: every pixel of the inconsistency mask."""

    name: ClassVar[str] = "labor_spl"
    strategy: ClassVar[str] = "spl"


class RandomPixelLabelling(LabelOnlyIfRequired):
    """The baseline: the same training, with uniformly random pixels labelled."""

    name: ClassVar[str] = "labor_random"
    strategy: ClassVar[str] = "random"


class EntropyPixelLabelling(LabelOnlyIfRequired):
    """The baseline: the same training, with the highest-entropy pixels labelled."""

    name: ClassVar[str] = "labor_entropy"
    strategy: ClassVar[str] = "entropy"

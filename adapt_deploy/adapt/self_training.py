"""CBST and CRST: rounds of self-training on class-balanced pseudo-labels of the target.

train.iterations is split into selftrain.rounds rounds. A round starts by pseudo-labelling the
whole target train split with the model as it is then (adapt/pseudo_labelling.py; written to
RUN/pseudo_labels/round_R/ in the Cityscapes layout, with the model that made them), keeping
per class the top `portion` of its pixels, the portion growing each round (CRST: 20% + 5% per
round, at most 50%); it then trains on the source and the pseudo-labelled target.

CRST adds a confidence regulariser on the pseudo-labelled pixels: MRKLD, KL(uniform || p), which
keeps the model from becoming over-confident on its own labels; LRENT, soft pseudo-labels
(p / k)^(1/alpha), normalized, from the round's labelling model, in place of the hard ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from adapt_deploy.adapt.base import Batch, Losses, Method, RunContext
from adapt_deploy.adapt.losses import pseudo_label_loss, soft_label_loss, uniform_kl_loss
from adapt_deploy.adapt.pseudo_labelling import (
    PseudoLabelJob,
    predict,
    read_round_label,
    samples_of,
    write_pseudo_labels,
)
from adapt_deploy.adapt.target_statistics import TargetStatistics
from adapt_deploy.data import pseudo_labels as files
from adapt_deploy.labels import CLASS_NAMES, IGNORE_INDEX
from adapt_deploy.models.checkpoints import (
    build_model,
    checkpoint_meta,
    read_checkpoint,
    save_checkpoint,
)
from adapt_deploy.models.deeplab import DeepLab

ROUNDS_DIR = "pseudo_labels"
ROUND_MODEL = "model.pt"  # the model that made a round's labels (LRENT's soft labels use it)


def round_starts(iterations: int, rounds: int) -> list[int]:
    """The first iteration of each round: train.iterations split as evenly as it goes."""
    return [r * iterations // rounds for r in range(rounds)]


def round_portion(round_index: int, portion: float, step: float, maximum: float) -> float:
    """The share of each class's pixels labelled in round `round_index` (0-based)."""
    return round(min(portion + round_index * step, maximum), 6)


class ClassBalancedSelfTraining(TargetStatistics, Method):
    """CBST: segmentation loss on the source plus cross-entropy on the round's pseudo-labels."""

    name: ClassVar[str] = "cbst"
    target_needs: ClassVar[str] = "images"

    def __init__(self, config, model, device) -> None:
        super().__init__(config, model, device)
        self.run: RunContext | None = None
        self.round = -1  # the round whose labels are in use (-1: none yet)
        self.thresholds = torch.ones(model.num_classes)  # k_c of the round (1: never labelled)

    def attach(self, run: RunContext) -> None:
        if run.target is None:
            raise ValueError(f"{self.name} needs the target train split")
        self.run = run

    def round_dir(self, round_index: int) -> Path:
        assert self.run is not None, "attach() first"
        return self.run.out / ROUNDS_DIR / f"round_{round_index + 1}"

    def before_iteration(self, iteration: int) -> None:
        """At a round's first iteration: pseudo-label the target with the current model; in a
        resumed run: take up the round it stopped in."""
        st = self.config.selftrain
        starts = round_starts(self.config.train.iterations, st.rounds)
        current = max(r for r, start in enumerate(starts) if start <= iteration)
        if current == self.round:
            return
        self._enter_round(current, starts[current], iteration)

    def _enter_round(self, index: int, start: int, iteration: int) -> None:
        run = self.run
        assert run is not None, "attach() first"
        folder = self.round_dir(index)
        names = [s.name for s in samples_of(run.target).samples]
        split = self.config.data.target.split
        if run.primary:
            self._label_round(index, start, iteration, folder)
        run.barrier()
        summary = files.require_complete(folder, split, names)
        self.thresholds = thresholds_of(summary, self.config.model.num_classes)
        self.round = index
        self._round_ready(folder)

    def _label_round(self, index: int, start: int, iteration: int, folder: Path) -> None:
        """Rank 0: the round's labels, made with the current model at the round's start.

        The folder belongs to this run: a set made at another iteration (train.iterations
        changed on resume, so the rounds moved) is made again; a run resumed inside a round
        keeps that round's complete set, or labels with the model as it is when there is none.
        """
        run, st = self.run, self.config.selftrain
        assert run is not None
        if iteration != start:
            if files.read_summary(folder) is not None:
                return
            run.reporter.log(f"{folder} is incomplete: labelling with the model at {iteration}")
            start = iteration
        portion = round_portion(index, st.portion, st.portion_step, st.portion_max)
        job = PseudoLabelJob(
            run.network,
            run.target,
            self.config.input,
            self.config.data.target.split,
            portion,
            f"run {run.out.name}, round {index + 1}, iteration {start}",
        )
        job_file = folder / files.JOB
        if job_file.is_file() and json.loads(job_file.read_text()) != job.record():
            shutil.rmtree(folder)  # labels of another schedule of this run
        run.reporter.log(
            f"self-training round {index + 1}/{st.rounds} from iteration {start}: labelling "
            f"the top {portion:.0%} of each class -> {folder}"
        )
        if files.read_summary(folder) is None:
            save_checkpoint(folder / ROUND_MODEL, run.network, checkpoint_meta(self.config, start))
        summary = write_pseudo_labels(job, folder, run.reporter)
        run.reporter.log(
            f"round {index + 1}: {summary['labelled_share']:.0%} of the target pixels labelled"
        )

    def _round_ready(self, folder: Path) -> None:
        """A hook for variants that need more of the round than its labels (LRENT)."""

    def round_labels(self, batch: Batch) -> torch.Tensor:
        """(N, H, W) pseudo-labels of a target batch from the current round, on the device."""
        size = tuple(batch["image"].shape[-2:])
        folder = self.round_dir(self.round)
        split = self.config.data.target.split
        return read_round_label(folder, split, list(batch["name"]), size).to(self.device)

    def target_losses(self, batch: Batch) -> Losses:
        labels = self.round_labels(batch)
        logits = self.model(self.input(batch))["logits"]
        return self.pseudo_losses(logits, labels, batch)

    def pseudo_losses(self, logits: torch.Tensor, labels: torch.Tensor, batch: Batch) -> Losses:
        """The target's losses given the student's logits and the round's hard labels."""
        return {"pseudo": self.config.selftrain.lambda_target * pseudo_label_loss(logits, labels)}


class ConfidenceRegularizedKLD(ClassBalancedSelfTraining):
    """CRST-MRKLD: CBST plus lambda_kld * KL(uniform || p) on the pseudo-labelled pixels."""

    name: ClassVar[str] = "crst_mrkld"

    def pseudo_losses(self, logits, labels, batch) -> Losses:
        losses = super().pseudo_losses(logits, labels, batch)
        mask = (labels != IGNORE_INDEX).float()
        losses["kld"] = self.config.selftrain.lambda_kld * uniform_kl_loss(logits, mask)
        return losses


class ConfidenceRegularizedEntropy(ClassBalancedSelfTraining):
    """CRST-LRENT: the pseudo-labelled pixels train on soft labels
    (p / k)^(1 / alpha) / Σ (p / k)^(1 / alpha), p from the model that made the round's labels:
    the minimiser of CE(label, p / k) minus alpha times the label's entropy."""

    name: ClassVar[str] = "crst_lrent"

    def __init__(self, config, model, device) -> None:
        super().__init__(config, model, device)
        self.labeller: DeepLab | None = None

    def _round_ready(self, folder: Path) -> None:
        checkpoint = read_checkpoint(folder / ROUND_MODEL)
        labeller = build_model(self.config.model)
        labeller.load_state_dict(checkpoint["model"])
        self.labeller = labeller.to(self.device).eval().requires_grad_(False)

    def pseudo_losses(self, logits, labels, batch) -> Losses:
        assert self.labeller is not None, "before_iteration() first"
        st = self.config.selftrain
        with torch.no_grad():
            image = batch["image"].to(self.device)
            probs = predict(self.labeller, image, self.config.input, tuple(labels.shape[-2:]))
            soft = soft_labels(probs, self.thresholds.to(probs.device), st.lrent_alpha)
        mask = (labels != IGNORE_INDEX).float()
        return {"pseudo_soft": st.lambda_target * soft_label_loss(logits, soft, mask)}


def soft_labels(probs: torch.Tensor, thresholds: torch.Tensor, alpha: float) -> torch.Tensor:
    """LRENT's soft labels: softmax over classes of log(p_c / k_c) / alpha."""
    scaled = torch.log(probs.clamp(min=1e-12)) - torch.log(thresholds.view(1, -1, 1, 1))
    return F.softmax(scaled / alpha, dim=1)


def thresholds_of(summary: dict, num_classes: int) -> torch.Tensor:
    """The round's k_c from its summary.json (1 for a class it labelled nowhere)."""
    classes = summary["classes"]
    values = []
    for name in CLASS_NAMES[:num_classes]:
        k = classes.get(name, {}).get("threshold")
        values.append(1.0 if k is None else max(float(k), 1e-6))
    return torch.tensor(values)

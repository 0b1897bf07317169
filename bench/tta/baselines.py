"""Continual test-time adaptation baselines: CoTTA, SAR and RDumb, at this benchmark's scale.

Batch size 1: each method sees one frame, scores it (`predict`), then adapts on it (`learn`).
The classification methods' per-sample rules (SAR's and ETA's entropy filter) apply per pixel
of the logits (1/8 of the input, where TENT's entropy is taken too); everything else is as in
the papers' released code, with each deviation named in the class docstring.
"""

from __future__ import annotations

import math
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adapt_deploy.data.normalize import normalize
from bench.tta.conditions import NUM_CLASSES, SIZE
from bench.tta.methods import TENT_LR, Tent, TorchModel, labels_of

# Adam as CoTTA's Cityscapes→ACDC code (mmseg single_gpu_cotta): 6e-5 / 8, "batch size 1 now,
# was 8 during Cityscapes training"; already a batch-1 rate, and Adam's step does not depend on
# the loss scale, so it carries over as it is.
COTTA_LR = 0.00006 / 8
# The segmentation code's test-time scales (each with and without a horizontal flip).
COTTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
# EATA's and SAR's reliability margin E0 = 0.4 ln C (their ImageNet code: 0.4 ln 1000).
ENTROPY_MARGIN = 0.4 * math.log(NUM_CLASSES)


def pixel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy of each pixel: (N, C, H, W) logits → (N, H, W)."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask`; 0 with zero gradients where the mask is empty (the
    released code's mean over no sample is NaN, but its gradients are zeros, as here)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


class SourceResetting(Tent):
    """TENT's setup (each frame's own BN statistics, BN affine parameters trained with SGD,
    momentum 0.9) plus a reset of the model and the optimizer to the source state."""

    def __init__(self, checkpoint: Path, lr: float, name: str) -> None:
        super().__init__(checkpoint, lr, name)
        self.source_model = deepcopy(self.model.state_dict())
        self.source_optimizer = deepcopy(self.optimizer.state_dict())
        self.resets = 0
        self.updates = 0

    def reset(self) -> None:
        self.model.load_state_dict(self.source_model)
        self.optimizer.load_state_dict(self.source_optimizer)
        self.resets += 1

    def counts(self) -> dict[str, int]:
        return {"updates": self.updates, "resets": self.resets}


class SAM:
    """Sharpness-aware minimization (Foret et al., ICLR 2021) around `base`, as SAR uses it:
    `ascend` moves the parameters to w + rho g / ||g|| with the gradient g at w; `descend`
    returns them to w and steps `base` with the gradient taken at the moved point."""

    def __init__(self, base: torch.optim.Optimizer, rho: float) -> None:
        self.base = base
        self.rho = rho
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def ascend(self) -> None:
        params = [p for g in self.base.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        scale = self.rho / (norm + 1e-12)
        self._saved = [(p, p.detach().clone()) for p in params]
        for p in params:
            p.add_(p.grad * scale)
        self.base.zero_grad(set_to_none=True)

    @torch.no_grad()
    def descend(self) -> None:
        for p, w in self._saved:
            p.copy_(w)
        self._saved = []
        self.base.step()
        self.base.zero_grad(set_to_none=True)


class SAR(SourceResetting):
    """SAR (Niu et al., ICLR 2023): reliable entropy minimization with sharpness-aware steps
    and model recovery, as mr-eggplant/SAR's sar.py.

    Trained: BN affine parameters except layer4's (sar.collect_params skips the top ResNet
    stage); all BN layers normalize with the frame's own statistics (SAR's setup for BN models).
    Step: entropy of the pixels below E0 = 0.4 ln C; SAM (rho 0.05) around SGD (momentum 0.9);
    the second forward at the perturbed weights keeps the pixels still below E0.
    Recovery: an EMA (0.9) of that second loss; below e_m = 0.2 the model and optimizer are
    reset to the source.
    Deviations: the paper's samples are images, here they are pixels (batch size 1: one frame
    is the whole batch); the paper recommends GN/LN models, this benchmark's DeepLab has BN,
    used with per-frame statistics as TENT does; lr is TENT_LR, since SAR's code gives SAR
    the same lr as Tent.
    """

    name = "sar"

    def __init__(
        self,
        checkpoint: Path,
        lr: float = TENT_LR,
        rho: float = 0.05,
        margin: float = ENTROPY_MARGIN,
        reset_below: float = 0.2,
        ema: float = 0.9,
        name: str = "sar",
    ) -> None:
        super().__init__(checkpoint, lr, name)
        self.sam = SAM(self.optimizer, rho)
        self.margin = margin
        self.reset_below = reset_below
        self.ema = ema
        self.loss_ema: float | None = None

    def trained_batchnorms(self) -> list[torch.nn.BatchNorm2d]:
        top = set(self.model.backbone.layer4.modules())
        return [m for m in self.model.batchnorms() if m not in top]

    def learn(self, image: np.ndarray) -> None:
        assert self._logits is not None
        entropy = pixel_entropy(self._logits)
        self._logits = None
        reliable = entropy.detach() < self.margin
        self.optimizer.zero_grad(set_to_none=True)
        masked_mean(entropy, reliable).backward()
        self.sam.ascend()
        moved = pixel_entropy(self.model(normalize(self.batch(image), self.spec))["logits"])
        still = reliable & (moved.detach() < self.margin)
        loss = masked_mean(moved, still)
        loss.backward()
        self.sam.descend()
        self.updates += int(bool(reliable.any()))
        if still.any():
            value = float(loss.detach())
            old = value if self.loss_ema is None else self.loss_ema
            self.loss_ema = self.ema * old + (1 - self.ema) * value
        if self.loss_ema is not None and self.loss_ema < self.reset_below:
            self.reset()
            self.loss_ema = None


class RDumb(SourceResetting):
    """RDumb (Press et al., NeurIPS 2023): ETA (EATA without its Fisher regularizer) reset to
    the source every `reset_every` steps, as oripress/CCC's models/rdumb.py.

    Trained: all BN affine parameters (SGD, momentum 0.9), BN on each frame's own statistics.
    Reliability: pixels with entropy below E0 = `margin`; the loss is their entropy weighted by
    1 / exp(entropy - E0). Redundancy: a reliable pixel is left out when |cos| of its
    probabilities with the moving average (0.9) of the kept pixels' mean probability is >= 0.05
    (EATA's epsilon); the average starts from the first frame with reliable pixels and moves
    only with kept pixels. Reset: model and optimizer to the source after every `reset_every` frames
    (T = 1000), the average forgotten; a step is a frame, updated or not, as in the code.
    Deviations: both filters are per pixel, the pixels of a frame being the batch (the paper's
    samples are images in batches of 64; per frame, the redundancy filter left out every frame
    after the first: 19-class mean probabilities of driving frames are 0.9-0.97 alike); lr is
    TENT_LR (RDumb uses Tent's/EATA's lr); E0 is 0.4 ln C as in EATA's paper and released
    runs, where rdumb.py hard-codes ln(1000)/2 - 1 (about 0.355 ln 1000).
    """

    name = "rdumb"

    def __init__(
        self,
        checkpoint: Path,
        lr: float = TENT_LR,
        margin: float = ENTROPY_MARGIN,
        redundancy: float = 0.05,
        reset_every: int = 1000,
        name: str = "rdumb",
    ) -> None:
        super().__init__(checkpoint, lr, name)
        self.margin = margin
        self.redundancy = redundancy
        self.reset_every = reset_every
        self.average: torch.Tensor | None = None
        self.steps = 0
        self.redundant = 0

    def learn(self, image: np.ndarray) -> None:
        assert self._logits is not None
        logits, self._logits = self._logits, None
        entropy = pixel_entropy(logits)
        kept = entropy.detach() < self.margin  # reliable
        probs = logits.detach().softmax(1).permute(0, 2, 3, 1)  # (1, h, w, C)
        if self.average is not None:  # redundant: too like what was already learned from
            similar = F.cosine_similarity(probs, self.average, dim=-1).abs() >= self.redundancy
            self.redundant += int((kept & similar).sum())
            kept &= ~similar
        if kept.any():
            weight = torch.exp(self.margin - entropy.detach())
            loss = (entropy * weight)[kept].mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.updates += 1
            mean = probs[kept].mean(0)
            self.average = mean if self.average is None else 0.9 * self.average + 0.1 * mean
        self.steps += 1
        if self.steps % self.reset_every == 0:
            self.reset()
            self.average = None

    def counts(self) -> dict[str, int]:
        return {**super().counts(), "redundant": self.redundant}


class CoTTA(TorchModel):
    """CoTTA (Wang et al., CVPR 2022) as its Cityscapes→ACDC segmentation code
    (mmseg single_gpu_cotta), which differs from the classification code.

    Student: every parameter trains (Adam, lr 6e-5 / 8, betas 0.9/0.999); the student, teacher
    and anchor all run in eval mode, so BN uses the source running statistics.
    Teacher: an EMA (0.999) of the student. Its prediction is scored and is the pseudo-label:
    per pixel, where the anchor (the frozen source) is confident (max softmax > 0.69 at scale
    1.0) the teacher's plain prediction, elsewhere the argmax of the teacher's softmax averaged
    over `scales` with and without a horizontal flip (the classification code's single image
    threshold and random augmentations are not what the segmentation code does).
    Loss: cross-entropy of the student at scale 1.0 against that hard pseudo-label, at label
    size. After each step: teacher EMA, then each student weight restored to the source with
    probability `restore` (0.01 in the segmentation code; 0.001 in the classification code).
    Deviations: the default scale set is the paper's full one (0.5 to 2.0, with flips: 14
    teacher forwards a frame, about 0.3 s at 128x256 on one thread for the benchmark's
    model); pass fewer `scales` (1.0 must stay) where that is too slow. Logits are upsampled
    bilinearly with align_corners=True (the project's evaluation) instead of mmseg's False.
    """

    name = "cotta"

    def __init__(
        self,
        checkpoint: Path,
        lr: float = COTTA_LR,
        ema: float = 0.999,
        restore: float = 0.01,
        confidence: float = 0.69,
        scales: tuple[float, ...] = COTTA_SCALES,
        seed: int = 0,
        name: str = "cotta",
    ) -> None:
        super().__init__(checkpoint)
        if 1.0 not in scales:
            raise ValueError(f"CoTTA needs scale 1.0 among its scales, got {scales}")
        self.name = name
        self.ema, self.restore, self.confidence, self.scales = ema, restore, confidence, scales
        self.model.eval().requires_grad_(True)
        self.params = list(self.model.parameters())
        self.source = [p.detach().clone() for p in self.params]
        self.teacher = deepcopy(self.model).requires_grad_(False)
        self.anchor = deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0
        self._pseudo: torch.Tensor | None = None

    @staticmethod
    def probs(model: torch.nn.Module, x: torch.Tensor, scale: float, flip: int) -> torch.Tensor:
        """Softmax at label size of `x` resized by `scale` and flipped, flipped back."""
        if scale != 1.0:
            size = (round(x.shape[2] * scale), round(x.shape[3] * scale))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        logits = model(x.flip(3) if flip else x)["logits"]
        up = F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=True).softmax(1)
        return up.flip(3) if flip else up

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> np.ndarray:
        x = normalize(self.batch(image), self.spec)
        views = {(s, f): self.probs(self.teacher, x, s, f) for s in self.scales for f in (0, 1)}
        plain, average = views[(1.0, 0)], torch.stack(list(views.values())).mean(0)
        confident = self.probs(self.anchor, x, 1.0, False).amax(1, keepdim=True) > self.confidence
        scores = torch.where(confident, plain, average)
        self._pseudo = scores.argmax(1)
        return labels_of(scores)

    def learn(self, image: np.ndarray) -> None:
        assert self._pseudo is not None
        logits = self.model(normalize(self.batch(image), self.spec))["logits"]
        up = F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=True)
        loss = F.cross_entropy(up, self._pseudo)
        self._pseudo = None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.params, strict=True):
                t.mul_(self.ema).add_(s, alpha=1 - self.ema)
            for p, p0 in zip(self.params, self.source, strict=True):
                back = torch.rand(p.shape, generator=self.generator) < self.restore
                p.copy_(torch.where(back, p0, p))

    def counts(self) -> dict[str, int]:
        return {"updates": self.updates}

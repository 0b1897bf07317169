"""The compared methods: each predicts a frame, then learns from it; all from the same weights."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adapt_deploy.config import InputConfig
from adapt_deploy.data.normalize import normalize
from adapt_deploy.engine.evaluate import predict_logits
from adapt_deploy.models.checkpoints import load_checkpoint
from adapt_deploy.runtime import Segmenter
from adapt_deploy.tta.bn import mix_batchnorms, set_adapting
from adapt_deploy.tta.options import AdaptOptions
from adapt_deploy.tta.session import AdaptSetup, open_adaptation
from adapt_deploy.tta.worker import AdaptWorker
from bench.tta.conditions import NUM_CLASSES, SIZE

# SGD, momentum 0.9. 1e-3 was picked over 1e-4 by hand in earlier runs that were not kept; the
# method tent_lr_1e-4 reproduces the comparison:
#   python -m bench.tta --methods tent,tent_lr_1e-4 --fps-rounds 0 --name tta_tent_lr
TENT_LR = 1e-3
TENT_LR_LOW = 1e-4
# bn_stats: each frame's weight in the test statistics, as the baseline has always run (the
# adapter's default, 0.05, assumes its bank: with one state for all conditions, an average that
# slow would lag every change of weather)
BN_STATS_MOMENTUM = 0.5


class Method:
    name = ""

    def predict(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def learn(self, image: np.ndarray) -> None:
        """Called after `predict` on the same frame."""

    def counts(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


class Runtime(Method):
    """The bundle on ONNX Runtime, never updated."""

    name = "none"

    def __init__(self, bundle: Path) -> None:
        self.segmenter = Segmenter.from_bundle(bundle, backend="onnxruntime", precision="fp32")
        self.presence = np.zeros(NUM_CLASSES, np.float32)

    def predict(self, image: np.ndarray) -> np.ndarray:
        result = self.segmenter(image)
        self.presence = result.presence
        return result.labels

    def close(self) -> None:
        self.segmenter.close()


class TorchModel(Method):
    """A PyTorch copy of the checkpoint, predicting at the label size as the project's
    evaluation does (engine.evaluate.predict_logits: bilinear, align_corners=True)."""

    def __init__(self, checkpoint: Path) -> None:
        self.model, config = load_checkpoint(checkpoint)
        self.spec = config.input
        self.model.eval()

    @staticmethod
    def batch(image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 → (1, 3, H, W) uint8, contiguous as the datasets hand it over."""
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].contiguous()

    def predict(self, image: np.ndarray) -> np.ndarray:
        logits = predict_logits(self.model, self.batch(image), self.spec, SIZE)
        return labels_of(logits)


def labels_of(logits: torch.Tensor) -> np.ndarray:
    """Labels (H, W) uint8 of logits (1, C, H, W) already at the label size."""
    return logits.argmax(1)[0].numpy().astype(np.uint8)


class BNStats(TorchModel):
    """Test-time BN statistics only (mixed BN with no source prior), no gradient."""

    name = "bn_stats"

    def __init__(self, checkpoint: Path, momentum: float) -> None:
        super().__init__(checkpoint)
        self.layers = mix_batchnorms(self.model, prior=0.0, momentum=momentum)

    @torch.no_grad()
    def learn(self, image: np.ndarray) -> None:
        set_adapting(self.layers, True)
        self.model(normalize(self.batch(image), self.spec))
        set_adapting(self.layers, False)


class Tent(TorchModel):
    """TENT: each frame's own BN statistics, entropy of the BN affine parameters, every frame."""

    name = "tent"

    def __init__(self, checkpoint: Path, lr: float, name: str = "tent") -> None:
        super().__init__(checkpoint)
        self.name = name
        self.model.requires_grad_(False)
        for m in self.model.batchnorms():
            m.train()
            m.track_running_stats = False
            m.running_mean, m.running_var = None, None
        params = [p for m in self.trained_batchnorms() for p in (m.weight, m.bias)]
        for p in params:
            p.requires_grad_(True)
        self.model.freeze_bn = False
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
        self._logits: torch.Tensor | None = None

    def trained_batchnorms(self) -> list[torch.nn.BatchNorm2d]:
        """The BN layers whose affine parameters train (all of them in TENT); every BN layer
        normalizes with the frame's own statistics either way."""
        return self.model.batchnorms()

    def predict(self, image: np.ndarray) -> np.ndarray:
        # predict_logits runs without gradient; the entropy step needs this forward's graph,
        # so the forward is the same one (normalize, model, bilinear align_corners=True) with it.
        self._logits = self.model(normalize(self.batch(image), self.spec))["logits"]
        up = F.interpolate(self._logits.detach(), size=SIZE, mode="bilinear", align_corners=True)
        return labels_of(up)

    def learn(self, image: np.ndarray) -> None:
        assert self._logits is not None
        log_p = F.log_softmax(self._logits, dim=1)
        loss = -(log_p.exp() * log_p).sum(1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._logits = None


class Ours(Runtime):
    """The OnlineAdapter behind the real ONNX Runtime sync: the stream's worker, run inline."""

    name = "ours"

    def __init__(self, bundle: Path, options: AdaptOptions, name: str = "ours") -> None:
        super().__init__(bundle)
        self.name = name
        self.worker = make_worker(bundle, self.segmenter, options, inline=True)
        self.index = 0

    def learn(self, image: np.ndarray) -> None:
        self.worker.offer(image, self.presence, self.index)
        self.index += 1
        self.worker.events()  # not kept: the counts below say what happened

    def counts(self) -> dict[str, int]:
        s = self.worker.summary
        return {
            "updates": s.adapted,
            "resets": s.resets,
            "syncs": s.syncs,
            "sync failures": s.sync_failures,
            "shifts": s.shifts,
            "switches": s.switches,
            "home frames": s.home,
        }


class OursFrameStats(Ours):
    """A probe, not a deployable method: ours, each frame scored by the adapter's teacher in
    PyTorch with that frame's own statistics entering every BN layer at `weight` (bn_stats
    does so at 0.5, RDumb in effect at 1). Every strong baseline normalises each frame with its
    own statistics, which a folded engine cannot: this says what ours would gain from a served
    network that does (BN as reductions in the exported graph, not folded)."""

    def __init__(self, bundle: Path, checkpoint: Path, options: AdaptOptions, weight: float):
        super().__init__(bundle, options, f"ours_frame_stats_{weight:g}")
        self.spec = load_checkpoint(checkpoint)[1].input
        self.weight = weight

    def predict(self, image: np.ndarray) -> np.ndarray:
        super().predict(image)  # the runtime's presence still drives the shift detector
        teacher = self.worker.adapter.teacher
        return labels_of(
            frame_stats_logits(teacher, TorchModel.batch(image), self.spec, self.weight)
        )


@torch.no_grad()
def frame_stats_logits(
    model: torch.nn.Module, images: torch.Tensor, spec: InputConfig, weight: float
) -> torch.Tensor:
    """`model`'s logits at the label size (as predict_logits) with the frame's own statistics
    entering every BN layer at `weight`, on a copy: `model` is left as it was."""
    copied = copy.deepcopy(model)
    layers = mix_batchnorms(copied, prior=0.0, momentum=weight)
    for layer in layers:  # the frame weighs 1/(n + 1), at least `weight`: n = 1 → 0.5
        layer.num_batches_tracked.fill_(1)
    set_adapting(layers, True)
    return predict_logits(copied, images, spec, SIZE)


def make_worker(
    bundle: Path, segmenter: Segmenter, options: AdaptOptions, inline: bool = False
) -> AdaptWorker:
    """The worker `stream --adapt` sets up for `bundle` (adapter, checked sync, shift detector)."""
    return open_adaptation(bundle, segmenter, AdaptSetup(options, wait=inline))


def method_makers(
    checkpoint: Path, bundle: Path, options: AdaptOptions
) -> dict[str, Callable[[], Method]]:
    """Every method by name, each made on demand from the same source weights."""
    from bench.tta.baselines import SAR, CoTTA, RDumb  # imports this module

    return {
        "none": lambda: Runtime(bundle),
        "bn_stats": lambda: BNStats(checkpoint, BN_STATS_MOMENTUM),
        "tent": lambda: Tent(checkpoint, TENT_LR),
        "ours": lambda: Ours(bundle, options),
        "ours_every_frame": lambda: Ours(bundle, replace(options, every=1), "ours_every_frame"),
        "ours_every_64": lambda: Ours(bundle, replace(options, every=64), "ours_every_64"),
        "ours_no_bank": lambda: Ours(bundle, replace(options, bank_size=0), "ours_no_bank"),
        # ablations (python -m bench.tta --methods ... --fps-rounds 0 --name tta_ablation)
        "ours_bn_stats_only": lambda: Ours(
            bundle,
            replace(options, weak_weight=0.0, entropy_weight=0.0, pixel_weight=0.0),
            "ours_bn_stats_only",
        ),
        "ours_weak_only": lambda: Ours(
            bundle, replace(options, entropy_weight=0.0, pixel_weight=0.0), "ours_weak_only"
        ),
        "ours_no_fade": lambda: Ours(bundle, replace(options, prior_fade=0.0), "ours_no_fade"),
        "ours_all_stages": lambda: Ours(
            bundle, replace(options, source_stages=0), "ours_all_stages"
        ),
        "ours_bn_momentum_0.5": lambda: Ours(
            bundle, replace(options, bn_momentum=0.5), "ours_bn_momentum_0.5"
        ),
        "ours_bn_prior_0.3": lambda: Ours(
            bundle, replace(options, bn_prior=0.3), "ours_bn_prior_0.3"
        ),
        "tent_lr_1e-4": lambda: Tent(checkpoint, TENT_LR_LOW, "tent_lr_1e-4"),
        # probes: ours scored with each frame's own statistics mixed in (not deployable)
        "ours_frame_stats_0.5": lambda: OursFrameStats(bundle, checkpoint, options, 0.5),
        "ours_frame_stats_1": lambda: OursFrameStats(bundle, checkpoint, options, 1.0),
        # continual TTA baselines (bench/tta/baselines.py)
        "cotta": lambda: CoTTA(checkpoint),
        "sar": lambda: SAR(checkpoint),
        "rdumb": lambda: RDumb(checkpoint),
    }

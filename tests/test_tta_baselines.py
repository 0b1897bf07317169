"""bench/tta/baselines.py: CoTTA's teacher and restore, SAR's filter, SAM and recovery, RDumb's
reset and redundancy filter, each on a tiny random DeepLab and frames at the benchmark's size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_checkpoint

from adapt_deploy.data.normalize import normalize
from bench.tta.baselines import SAM, SAR, CoTTA, RDumb
from bench.tta.conditions import NUM_CLASSES, SIZE
from bench.tta.methods import TorchModel

ALL = math.log(NUM_CLASSES) + 0.1  # an entropy margin above every pixel's entropy


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("baselines") / "tiny.pt")


def frame(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*SIZE, 3), dtype=np.uint8)


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def step(method, image: np.ndarray) -> np.ndarray:
    labels = method.predict(image)
    method.learn(image)
    return labels


def test_cotta_teacher_moves_by_the_ema_share_of_the_student(checkpoint):
    cotta = CoTTA(checkpoint, lr=1e-2, restore=0.0, scales=(1.0,))
    source = weights(cotta.model)
    labels = step(cotta, frame())
    assert labels.shape == SIZE and labels.dtype == np.uint8
    for s0, s, t in zip(source, cotta.model.parameters(), cotta.teacher.parameters(), strict=True):
        torch.testing.assert_close(t - s0, 0.001 * (s - s0), rtol=0, atol=1e-6)
    moved = [
        float((s.detach() - s0).abs().sum())
        for s0, s in zip(source, cotta.model.parameters(), strict=True)
    ]
    assert sum(moved) > 1.0
    assert same(source, weights(cotta.anchor))


def test_cotta_restore_with_probability_one_returns_the_student_to_the_source(checkpoint):
    cotta = CoTTA(checkpoint, lr=1e-2, restore=1.0, scales=(1.0,))
    source = weights(cotta.model)
    step(cotta, frame())
    assert same(source, weights(cotta.model))
    assert not same(source, weights(cotta.teacher))  # the teacher took the step's share


def test_cotta_scores_the_teacher_gated_by_the_anchor(checkpoint):
    image = frame(1)
    plain = TorchModel(checkpoint).predict(image)
    # anchor always confident: the teacher's plain prediction (the source, before any step)
    assert np.array_equal(
        CoTTA(checkpoint, confidence=-1.0, scales=(0.5, 1.0)).predict(image), plain
    )
    # never confident: the average over scales 0.5 and 1.0 with flips
    averaged = CoTTA(checkpoint, confidence=2.0, scales=(0.5, 1.0))
    x = normalize(averaged.batch(image), averaged.spec)
    with torch.no_grad():
        views = [averaged.probs(averaged.model, x, s, f) for s in (0.5, 1.0) for f in (0, 1)]
    expected = torch.stack(views).mean(0).argmax(1)[0].numpy()
    assert np.array_equal(averaged.predict(image), expected)
    with pytest.raises(ValueError, match=r"scale 1\.0"):
        CoTTA(checkpoint, scales=(0.5, 2.0))


def test_sam_steps_with_the_gradient_at_the_perturbed_point():
    w = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    sam = SAM(torch.optim.SGD([w], lr=0.1), rho=0.5)
    (w**2).sum().backward()  # g = 2w = (6, -8), |g| = 10
    sam.ascend()
    torch.testing.assert_close(w.detach(), torch.tensor([3.3, -4.4]))
    (w**2).sum().backward()  # gradient at the moved point: (6.6, -8.8)
    sam.descend()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0 - 0.66, -4.0 + 0.88]))


def test_sar_skips_pixels_above_the_margin(checkpoint):
    sar = SAR(checkpoint, margin=0.0)  # every pixel's entropy is above 0
    source = weights(sar.model)
    step(sar, frame())
    assert same(source, weights(sar.model)) and sar.loss_ema is None
    sar = SAR(checkpoint, margin=ALL, reset_below=0.0)  # every pixel reliable
    step(sar, frame())
    assert not same(source, weights(sar.model)) and sar.loss_ema is not None


def test_sar_trains_bn_affine_parameters_below_layer4_only(checkpoint):
    sar = SAR(checkpoint)
    trained = {id(p) for g in sar.optimizer.param_groups for p in g["params"]}
    expected = {
        id(p)
        for name, m in sar.model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d) and ".layer4." not in name
        for p in (m.weight, m.bias)
    }
    assert trained == expected and len(expected) < 2 * len(sar.model.batchnorms())
    assert all(p.requires_grad == (id(p) in trained) for p in sar.model.parameters())


def test_sar_resets_when_the_loss_average_drops_below_the_bound(checkpoint):
    sar = SAR(checkpoint, margin=ALL, reset_below=100.0)
    source = weights(sar.model)
    step(sar, frame())
    assert sar.resets == 1 and sar.loss_ema is None
    assert same(source, weights(sar.model))
    assert sar.counts() == {"updates": 1, "resets": 1}
    kept = SAR(checkpoint, margin=ALL, reset_below=0.0)
    step(kept, frame())
    assert kept.resets == 0 and not same(source, weights(kept.model))


def test_rdumb_resets_after_exactly_n_steps(checkpoint):
    rdumb = RDumb(checkpoint, margin=ALL, redundancy=2.0, reset_every=3)  # nothing redundant
    source = weights(rdumb.model)
    for i in range(2):
        step(rdumb, frame(i))
        assert rdumb.resets == 0 and not same(source, weights(rdumb.model))
    step(rdumb, frame(2))
    assert rdumb.resets == 1 and rdumb.average is None
    assert same(source, weights(rdumb.model))
    assert rdumb.counts() == {"updates": 3, "resets": 1, "redundant": 0}


def test_rdumb_skips_a_repeated_frame_as_redundant(checkpoint):
    rdumb = RDumb(checkpoint, margin=ALL)
    step(rdumb, frame())
    after_first = weights(rdumb.model)
    step(rdumb, frame())
    counts = rdumb.counts()  # every reliable pixel of the repeat is like the average: left out
    assert counts["updates"] == 1 and counts["resets"] == 0 and counts["redundant"] > 0
    assert same(after_first, weights(rdumb.model))
    fresh = RDumb(checkpoint, margin=ALL, redundancy=2.0)
    step(fresh, frame())
    step(fresh, frame())
    assert fresh.updates == 2

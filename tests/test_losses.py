"""The adaptation losses against hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adapt_deploy.adapt.losses import (
    EPS,
    adversarial_loss,
    category_adversarial_loss,
    category_discriminator_loss,
    discriminator_loss,
    entropy_loss,
    point_loss,
    segmentation_loss,
    weak_label_loss,
    weighted_self_information,
)


def bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- segmentation ---------------------------------------------------------------------------


def test_segmentation_loss_by_hand_with_ignored_pixels() -> None:
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    labels = torch.tensor([[[0, 255]]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))  # the 255 pixel counts for nothing
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_segmentation_loss_upsamples_with_align_corners() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 7, 9))
    labels[0, :2] = 255
    up = F.interpolate(logits, size=(7, 9), mode="bilinear", align_corners=True)
    expected = F.cross_entropy(up, labels, ignore_index=255)
    torch.testing.assert_close(segmentation_loss(logits, labels), expected)


# --- weak labels and points -----------------------------------------------------------------


def test_weak_label_loss_by_hand() -> None:
    lse = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    terms = [bce(0.5, 1), bce(sigmoid(2), 0), bce(sigmoid(-1), 0), bce(sigmoid(3), 1)]
    assert weak_label_loss(lse, y).item() == pytest.approx(sum(terms) / 4, rel=1e-6)


def test_weak_label_loss_clamps_extreme_logits() -> None:
    lse = torch.tensor([[1e4, -1e4, 80.0]], requires_grad=True)
    y = torch.tensor([[0.0, 1.0, 1.0]])
    loss = weak_label_loss(lse, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lse.grad).all()
    # Wrong and saturated: bounded by the official clamp to [EPS, 1 - EPS] (in float32).
    hi = torch.tensor(1 - EPS).item()
    expected = (-math.log(EPS) - math.log(1 - hi) - math.log(hi)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_point_loss_is_the_mean_over_points() -> None:
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1, 0, 0] = 2.0
    points = torch.full((1, 2, 2), 255)
    points[0, 0, 0] = 1  # a point of class 1 where class 1 has logit 2
    points[0, 1, 1] = 2  # a point of class 2 on a uniform pixel
    first = -math.log(math.exp(2) / (math.exp(2) + 2))
    expected = (first + math.log(3)) / 2
    assert point_loss(logits, points).item() == pytest.approx(expected, rel=1e-6)
    # A point whose class is absent from the weak labels is skipped, as the official code does.
    present = torch.tensor([[1.0, 1.0, 0.0]])
    assert point_loss(logits, points, present).item() == pytest.approx(first, rel=1e-6)


def test_point_loss_upsamples_and_survives_no_points() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, requires_grad=True)
    points = torch.full((2, 9, 17), 255)
    points[0, 4, 7], points[1, 8, 16] = 3, 0
    up = F.interpolate(logits, size=(9, 17), mode="bilinear", align_corners=True)
    expected = -(F.log_softmax(up[0, :, 4, 7], 0)[3] + F.log_softmax(up[1, :, 8, 16], 0)[0]) / 2
    torch.testing.assert_close(point_loss(logits, points), expected)
    empty = point_loss(logits, torch.full((2, 9, 17), 255))
    empty.backward()
    assert empty.item() == 0.0 and (logits.grad == 0).all()


# --- output-space adversarial ---------------------------------------------------------------


def test_adversarial_loss_bce_and_lsgan_by_hand() -> None:
    d = torch.tensor([[[[0.0, 2.0]]]])
    assert adversarial_loss(d, 0.0).item() == pytest.approx(
        (bce(0.5, 0) + bce(sigmoid(2), 0)) / 2, rel=1e-6
    )
    assert adversarial_loss(d, 1.0, "bce").item() == pytest.approx(
        (bce(0.5, 1) + bce(sigmoid(2), 1)) / 2, rel=1e-6
    )
    # WDA's LS-GAN regresses sigmoid(D) to 1 - label.
    ls_source = 0.5 * ((0.5 - 1) ** 2 + (sigmoid(2) - 1) ** 2) / 2
    ls_target = 0.5 * (0.5**2 + sigmoid(2) ** 2) / 2
    assert adversarial_loss(d, 0.0, "lsgan").item() == pytest.approx(ls_source, rel=1e-6)
    assert adversarial_loss(d, 1.0, "lsgan").item() == pytest.approx(ls_target, rel=1e-6)
    both = discriminator_loss(d, d, "lsgan").item()
    assert both == pytest.approx((ls_source + ls_target) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="GAN mode"):
        adversarial_loss(d, 0.0, "wgan")  # type: ignore[arg-type]


def test_adversarial_loss_modes_stay_finite_at_extremes() -> None:
    d = torch.tensor([[[[1e4, -1e4]]]], requires_grad=True)
    for mode in ("bce", "lsgan"):
        loss = adversarial_loss(d, 0.0, mode)
        (g,) = torch.autograd.grad(loss, d)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


# --- entropy --------------------------------------------------------------------------------


def test_entropy_of_uniform_is_one_and_of_one_hot_is_zero() -> None:
    assert entropy_loss(torch.zeros(2, 19, 3, 4)).item() == pytest.approx(1.0, rel=1e-6)
    one_hot = torch.full((1, 5, 2, 2), -1e4)
    one_hot[:, 2] = 1e4
    assert entropy_loss(one_hot).item() == pytest.approx(0.0, abs=1e-7)


def test_entropy_by_hand_and_against_advent_self_information() -> None:
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25])).view(1, 3, 1, 1)
    expected = (0.5 * math.log(2) + 2 * 0.25 * math.log(4)) / math.log(3)
    assert entropy_loss(logits).item() == pytest.approx(expected, rel=1e-6)

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    probs = torch.softmax(logits, dim=1)
    info = weighted_self_information(probs)
    assert info.shape == probs.shape
    torch.testing.assert_close(info[0, 0], -probs[0, 0] * torch.log2(probs[0, 0] + 1e-30) / 2)
    # ADVENT's entropy_loss is the sum of prob_2_entropy over classes, averaged over pixels.
    torch.testing.assert_close(info.sum(1).mean(), entropy_loss(logits))


# --- category-wise (Eq. 4 and 5) -------------------------------------------------------------


def test_category_losses_by_hand() -> None:
    d_s = torch.tensor([[0.0, 1.0, 5.0], [2.0, -1.0, 0.0]])
    d_t = torch.tensor([[1.0, 0.0, -3.0], [0.0, 0.0, 0.0]])
    y_s = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    y_t = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # the second image has no class
    # Per image the mean over present classes, then the mean over images with any present.
    source = ((bce(0.5, 0) + bce(sigmoid(1), 0)) / 2 + bce(sigmoid(-1), 0)) / 2
    target = bce(sigmoid(-3), 1)
    d_loss = category_discriminator_loss(d_s, d_t, y_s, y_t)
    assert d_loss.item() == pytest.approx((source + target) / 2, rel=1e-6)
    g_loss = category_adversarial_loss(d_t, y_t)
    assert g_loss.item() == pytest.approx(bce(sigmoid(-3), 0), rel=1e-6)
    ls = category_adversarial_loss(d_t, y_t, "lsgan")
    assert ls.item() == pytest.approx(0.5 * (sigmoid(-3) - 1) ** 2, rel=1e-6)


def test_absent_classes_get_exactly_zero_gradient() -> None:
    torch.manual_seed(0)
    d_s = torch.randn(3, 5).mul(50).requires_grad_(True)
    d_t = torch.randn(3, 5).mul(50).requires_grad_(True)
    y_s = (torch.rand(3, 5) > 0.5).float()
    y_t = (torch.rand(3, 5) > 0.5).float()
    y_t[1] = 0.0
    for mode in ("bce", "lsgan"):
        d_s.grad = d_t.grad = None
        loss = category_discriminator_loss(d_s, d_t, y_s, y_t, mode) + category_adversarial_loss(
            d_t, y_t, mode
        )
        loss.backward()
        assert (d_s.grad[y_s == 0] == 0).all() and (d_t.grad[y_t == 0] == 0).all()
        assert (d_s.grad[y_s == 1] != 0).any()


def test_category_losses_without_any_present_class_are_zero() -> None:
    d = torch.randn(2, 4, requires_grad=True)
    none = torch.zeros(2, 4)
    loss = category_adversarial_loss(d, none) + category_discriminator_loss(d, d, none, none)
    loss.backward()
    assert loss.item() == 0.0 and (d.grad == 0).all()


# --- data-parallel training: pixel counts shared over the processes ---------------------------


def _shards_step(loss_of, shards, reduce_counts: bool):
    """(loss, gradient) of data-parallel training simulated in one process: each shard's loss
    and gradient, averaged as DDP averages them. With `reduce_counts` the pixel counts are the
    mean over the shards, as the engine's collectives make them under torchrun: a first pass
    records each shard's counts in call order."""
    from adapt_deploy.adapt.data_parallel import Collectives, collectives

    def shared_pixel_counts(mean):
        return collectives(Collectives(mean=mean, earlier=lambda values: []))

    counts: list[list[float]] = []
    for shard in shards:
        seen: list[float] = []
        with shared_pixel_counts(lambda c, seen=seen: seen.append(float(c)) or c):
            loss_of(*shard)
        counts.append(seen)
    means = [sum(c) / len(c) for c in zip(*counts, strict=True)]
    losses, grads = [], []
    for shard in shards:
        calls = iter(means)
        logits = shard[0].detach().requires_grad_(True)
        if reduce_counts:
            with shared_pixel_counts(
                lambda c, calls=calls: torch.tensor(next(calls), dtype=c.dtype)
            ):
                loss = loss_of(logits, *shard[1:])
        else:
            loss = loss_of(logits, *shard[1:])
        loss.backward()
        losses.append(loss.detach())
        grads.append(logits.grad)
    return sum(losses) / len(shards), torch.cat(grads) / len(shards)


def _split(*tensors):
    return [tuple(t[i : i + 1] for t in tensors) for i in range(tensors[0].shape[0])]


@pytest.mark.parametrize(
    "name", ["segmentation", "pseudo_label", "point", "soft_label", "uniform_kl", "class_masked"]
)
def test_shared_counts_make_the_sharded_step_the_whole_batch_step(name):
    from adapt_deploy.adapt import losses as L

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 6, 8))
    labels[0, :5] = 255  # image 0 has few labelled pixels, image 1 many
    mask = (labels != 255).double()
    soft = torch.softmax(torch.randn(2, 5, 6, 8, dtype=torch.float64), 1)
    classes = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    cases = {
        "segmentation": (L.segmentation_loss, (logits, labels)),
        "pseudo_label": (L.pseudo_label_loss, (logits, labels)),
        "point": (L.point_loss, (logits, labels)),
        "soft_label": (lambda x, s, m: L.soft_label_loss(x, s, m), (logits, soft, mask)),
        "uniform_kl": (L.uniform_kl_loss, (logits, mask)),
        "class_masked": (L.class_masked_segmentation_loss, (logits, labels, classes)),
    }
    loss_of, args = cases[name]
    whole = args[0].detach().requires_grad_(True)
    expected = loss_of(whole, *args[1:])
    expected.backward()
    loss, grad = _shards_step(loss_of, _split(*args), reduce_counts=True)
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(grad, whole.grad)
    own_counts, _ = _shards_step(loss_of, _split(*args), reduce_counts=False)
    assert not torch.isclose(own_counts, expected.detach())  # each shard's own count differs

"""Teacher-student self-training (DACS / DAFormer) and its weakly supervised variants."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_weights
from torch import nn

from adapt_deploy import registry
from adapt_deploy.adapt.losses import pseudo_label_loss
from adapt_deploy.adapt.selftrain import keep_present, with_points
from adapt_deploy.adapt.target_statistics import TargetStatistics
from adapt_deploy.adapt.teacher import EmaTeacher, class_mix, confidence_weight
from adapt_deploy.config import load_config
from adapt_deploy.data.weak import write_class_stats, write_points
from adapt_deploy.engine.train import build_learner, train
from adapt_deploy.models.deeplab import DeepLab


def stripes(classes: list[int], height: int, width: int) -> torch.Tensor:
    """A label map of vertical stripes, one per class, of equal width."""
    columns = torch.tensor(classes).repeat_interleave(width // len(classes))
    return columns.expand(height, width).clone()


def test_class_mix_pastes_half_of_the_source_classes_over_the_resized_target():
    # The source is twice the target's size: nearest resizing keeps every stripe's class.
    source_label = torch.stack([stripes([0, 1, 2, 3], 8, 16), stripes([4, 5, 6, 255], 8, 16)])
    source_image = torch.rand(2, 3, 8, 16) * 255
    target_label = torch.full((2, 4, 8), 9)
    target_image = torch.rand(2, 3, 4, 8) * 255
    resized = F.interpolate(source_image, size=(4, 8), mode="bilinear", align_corners=False)
    seen = set()
    for seed in range(8):
        generator = torch.Generator().manual_seed(seed)
        image, label, pasted = class_mix(
            source_image, source_label, target_image, target_label, generator
        )
        for i, present in enumerate([{0, 1, 2, 3}, {4, 5, 6}]):
            small = source_label[i, ::2, ::2]
            chosen = set(small[pasted[i]].tolist())
            assert chosen <= present and len(chosen) == math.ceil(len(present) / 2)
            assert torch.equal(pasted[i], torch.isin(small, torch.tensor(sorted(chosen))))
            assert torch.equal(label[i], torch.where(pasted[i], small, 9))
            assert torch.equal(image[i], torch.where(pasted[i], resized[i], target_image[i]))
            seen.add((i, tuple(sorted(chosen))))
    assert len(seen) > 2  # the classes are drawn, not fixed


def test_class_mix_is_reproducible_from_its_generator():
    label = torch.stack([stripes([0, 1, 2, 3, 4, 5], 4, 12)] * 3)
    image = torch.zeros(3, 3, 4, 12)

    def pasted(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return class_mix(image, label, image, label, generator)[2]

    assert torch.equal(pasted(3), pasted(3))


def test_confidence_weight_is_the_share_of_confident_pixels_per_image():
    confidence = torch.tensor([[[0.99, 0.5], [0.97, 0.968]], [[0.2, 0.2], [0.2, 0.2]]])
    weight = confidence_weight(confidence, 0.968)
    torch.testing.assert_close(weight, torch.tensor([0.5, 0.0]))


def test_ema_teacher_follows_the_student_with_a_warm_up():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = EmaTeacher(student, ema=0.9)
    assert not teacher.network.training
    assert not any(p.requires_grad for p in teacher.network.parameters())
    assert [teacher.alpha(s) for s in (0, 1, 3, 100)] == [0.0, 0.5, 0.75, 0.9]

    before = [p.clone() for p in teacher.network.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(3.0)
    teacher.update(student, step=1)  # alpha 0.5
    for t, t0, s in zip(teacher.network.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.5 * t0 + 0.5 * s)
    assert torch.equal(teacher.network[1].running_mean, torch.full((2,), 3.0))

    before = [p.clone() for p in teacher.network.parameters()]
    teacher.update(student, step=100)  # alpha = ema
    for t, t0, s in zip(teacher.network.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)


def test_teacher_pseudo_labels_an_image_whatever_else_is_in_the_batch():
    torch.manual_seed(0)
    network = DeepLab("resnet18", 19, width=8, freeze_bn=False).train()
    teacher = EmaTeacher(network, ema=0.99)
    images = torch.randn(2, 3, 24, 40)
    labels, confidence = teacher.pseudo_labels(images)
    alone, alone_confidence = teacher.pseudo_labels(images[:1])
    assert labels.shape == confidence.shape == (2, 24, 40) and labels.dtype == torch.int64
    assert torch.equal(labels[:1], alone)  # BN uses running statistics, not the batch's
    torch.testing.assert_close(confidence[:1], alone_confidence)
    assert bool((confidence >= 1 / 19).all() and (confidence <= 1).all())


def test_image_labels_drop_pseudo_labels_of_absent_classes():
    labels = torch.tensor([[[0, 1], [2, 255]], [[0, 1], [2, 2]]])
    present = torch.zeros(2, 19)
    present[0, [0, 2]] = 1
    present[1, [1]] = 1
    expected = torch.tensor([[[0, 255], [2, 255]], [[255, 1], [255, 255]]])
    assert torch.equal(keep_present(labels, present), expected)


def test_points_overwrite_pseudo_labels_at_weight_one():
    labels = torch.tensor([[[0, 1], [2, 3]]])
    weight = torch.full((1, 2, 2), 0.25)
    points = torch.tensor([[[255, 7], [255, 255]]])
    labels, weight = with_points(labels, weight, points)
    assert torch.equal(labels, torch.tensor([[[0, 7], [2, 3]]]))
    torch.testing.assert_close(weight, torch.tensor([[[0.25, 1.0], [0.25, 0.25]]]))


def test_weighted_cross_entropy_averages_over_all_pixels_ignored_ones_as_zero():
    logits = torch.zeros(1, 4, 2, 2)  # uniform: every labelled pixel's CE is log 4
    labels = torch.tensor([[[0, 1], [2, 255]]])
    weight = torch.tensor([[[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]]])[:, :, :2]
    expected = (1.0 + 0.5 + 1.0) * math.log(4) / 4
    torch.testing.assert_close(pseudo_label_loss(logits, labels, weight), torch.tensor(expected))


def learner_for(config_file, method: str, *options: str):
    config = load_config(config_file, [f"train.method={method}", *options])
    return build_learner(config, torch.device("cpu"))


def pseudo_loss(method, target: dict) -> torch.Tensor:
    """The pseudo-label loss of one iteration on a random source batch and `target`."""
    generator = torch.Generator().manual_seed(0)
    source = {
        "image": torch.randint(0, 256, (2, 3, 36, 64), dtype=torch.uint8, generator=generator),
        "label": torch.stack([stripes([0, 1, 2, 3], 36, 64), stripes([4, 5, 6, 7], 36, 64)]),
    }
    method.before_iteration(0)
    method.source_losses(source)
    return method.target_losses(target)["pseudo"]


def target_batch(**labels) -> dict:
    image = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    return {"image": image, **labels}


# A random teacher is never 99.99% sure: every target pixel's confidence weight is 0.
UNSURE = "selftrain.confidence=0.9999"


@pytest.mark.parametrize("weighting", ["image", "pixel"])
def test_pasted_source_pixels_weigh_one_and_unsure_target_pixels_nothing(
    tiny_config_file, weighting
):
    how = f"selftrain.weighting={weighting}"
    mixed = learner_for(tiny_config_file, "selftrain", UNSURE, how).method
    assert pseudo_loss(mixed, target_batch()) > 0
    alone = learner_for(tiny_config_file, "selftrain", UNSURE, how, "selftrain.class_mix=false")
    assert pseudo_loss(alone.method, target_batch()) == 0


def test_pixel_weights_keep_only_the_confident_pixels(tiny_config_file):
    """Per-pixel weighting: the loss is the CE of the teacher's labels weighted 1 where the
    teacher's confidence passes tau and 0 elsewhere (a random teacher's is near 1/19)."""
    options = ("selftrain.class_mix=false", "selftrain.weighting=pixel", "selftrain.confidence=0.1")
    method = learner_for(tiny_config_file, "selftrain", *options).method
    target = target_batch()
    loss = pseudo_loss(method, target)
    image = method.input(target)
    labels, confidence = method.teacher.pseudo_labels(image)
    confident = (confidence > 0.1).float()
    assert 0 < confident.mean() < 1
    expected = pseudo_label_loss(method.model(image)["logits"], labels, confident)
    torch.testing.assert_close(loss, expected)


def test_points_weigh_one_unless_their_class_is_absent(tiny_config_file):
    options = (UNSURE, "selftrain.class_mix=false", "adapt.dropout=0.0")
    learner = learner_for(tiny_config_file, "selftrain_point", *options)
    points = torch.full((2, 32, 64), 255)
    points[1, 5, 7] = 3
    batch = target_batch(image_labels=torch.ones(2, 19), points=points)
    logits = learner.method.model(learner.method.input(batch))["logits"]
    up = F.interpolate(logits, size=(32, 64), mode="bilinear", align_corners=True)
    expected = F.cross_entropy(up[1:, :, 5, 7], torch.tensor([3])) / points.numel()
    torch.testing.assert_close(pseudo_loss(learner.method, batch), expected)
    batch["image_labels"][1, 3] = 0
    assert pseudo_loss(learner.method, batch) == 0


def test_the_teacher_follows_the_student_after_each_step(tiny_config_file):
    learner = learner_for(tiny_config_file, "selftrain")
    teacher = learner.method.teacher.network
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(torch.equal(v, learner.model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(1.0)
    learner.method.after_step(0)  # the first step: alpha 0.5
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, before[name] + 0.5)


@pytest.fixture
def weak_labels(cityscapes_root):
    """The target's class statistics and point labels, as the CLI writes them."""
    write_class_stats(cityscapes_root, "cityscapes", "train")
    write_points(cityscapes_root, "cityscapes", "train", seed=0)
    return cityscapes_root


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("method", "options", "keys"),
    [
        ("selftrain", [], {"seg", "pseudo"}),
        ("selftrain", ["selftrain.class_mix=false"], {"seg", "pseudo"}),
        ("selftrain_image", [], {"seg", "pseudo", "weak"}),
        ("selftrain_point", [], {"seg", "pseudo", "weak", "point"}),
    ],
)
def test_each_method_trains_with_finite_losses(
    tmp_path, tiny_config_file, weak_labels, method, options, keys
):
    overrides = [f"train.method={method}", "train.iterations=3", *options]
    config = load_config(tiny_config_file, overrides)
    train(config, tmp_path / "run", evaluate_at_end=False)
    logged = records(tmp_path / "run")
    assert len(logged) == 3
    for record in logged:
        assert set(record) == keys | {"iteration", "loss", "lr", "images_per_second"}
        assert all(math.isfinite(record[k]) for k in keys)
    state = torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=True)
    assert set(state["method"]["teacher"]) == set(state["model"])


def test_resume_continues_the_teacher_and_the_mixing_exactly(
    tmp_path, tiny_config_file, weak_labels
):
    # Every pixel's pseudo-label counts (confidence 0) and no dropout draws from the global RNG
    # (the trainer does not save it), so the teacher's weights decide the losses.
    common = ["train.method=selftrain_point", "selftrain.confidence=0.0", "adapt.dropout=0.0"]
    straight = load_config(tiny_config_file, [*common, "train.iterations=6"])
    train(straight, tmp_path / "straight", evaluate_at_end=False)
    first = load_config(tiny_config_file, [*common, "train.iterations=3"])
    train(first, tmp_path / "split", evaluate_at_end=False)
    train(straight, tmp_path / "split", resume=True, evaluate_at_end=False)

    assert_same_weights(tmp_path / "straight", tmp_path / "split")
    teachers = [
        torch.load(tmp_path / run / "trainer_state.pt", weights_only=True)["method"]["teacher"]
        for run in ("straight", "split")
    ]
    for key in teachers[0]:
        torch.testing.assert_close(teachers[0][key], teachers[1][key], rtol=1e-5, atol=1e-6)
    pseudo = [[r["pseudo"] for r in records(tmp_path / run)] for run in ("straight", "split")]
    assert pseudo[0] == pytest.approx(pseudo[1], rel=1e-5)


def running_means(network: nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in network.modules() if isinstance(m, nn.BatchNorm2d)]


def target_statistics_methods() -> list[str]:
    """Every registered method that keeps BN's running statistics to the target passes."""
    return [
        n
        for n in registry.METHODS.names()
        if issubclass(registry.METHODS.load(n), TargetStatistics)
    ]


@pytest.mark.parametrize("method", target_statistics_methods())
@pytest.mark.parametrize(("bn_stats", "source_moves_them"), [("target", False), ("all", True)])
def test_bn_stats_decides_whether_the_source_pass_moves_the_running_statistics(
    tiny_config_file, method, bn_stats, source_moves_them
):
    learner = learner_for(tiny_config_file, method, f"selftrain.bn_stats={bn_stats}")
    network = learner.model
    network.train()
    before = running_means(network)
    source = {
        "image": torch.randint(0, 256, (2, 3, 36, 64), dtype=torch.uint8),
        "label": torch.stack([stripes([0, 1, 2, 3], 36, 64), stripes([4, 5, 6, 7], 36, 64)]),
    }
    learner.method.source_losses(source)
    moved = [not torch.equal(a, b) for a, b in zip(before, running_means(network), strict=True)]
    assert all(moved) if source_moves_them else not any(moved)
    if method == "selftrain":  # its target pass (on the mixed images) always moves them
        after_source = running_means(network)
        learner.method.before_iteration(0)
        learner.method.source_losses(source)
        learner.method.target_losses(target_batch())
        now = running_means(network)
        assert all(not torch.equal(a, b) for a, b in zip(after_source, now, strict=True))


def test_class_mix_in_shards_draws_what_one_process_draws_for_each_image():
    """Under torchrun each process mixes its shard with the same per-iteration generator: it
    skips the draws of the shards before it, so every image gets its one-process classes."""
    from adapt_deploy.adapt.data_parallel import Collectives, collectives

    label = torch.stack([stripes(classes, 4, 12) for classes in ([0, 1, 2], [3, 4, 5, 6, 7, 8])])
    image = torch.zeros(2, 3, 4, 12)
    whole = class_mix(image, label, image, label, torch.Generator().manual_seed(5))[2]

    def shard(i: int, earlier: list[int]) -> torch.Tensor:
        active = Collectives(mean=lambda t: t, earlier=lambda values: earlier)
        with collectives(active):
            part = label[i : i + 1], image[i : i + 1]
            generator = torch.Generator().manual_seed(5)
            return class_mix(part[1], part[0], part[1], part[0], generator)[2]

    assert torch.equal(shard(0, []), whole[:1])
    assert torch.equal(shard(1, [3]), whole[1:])  # image 0 drew from its 3 classes first
    assert not torch.equal(shard(1, []), whole[1:])  # starting over would draw other classes

"""Multi-source training (MADAN-style): data.sources config, source mixing and its exact resume,
per-source class sets, per-source and aggregate discriminators, FDA, the synthetic SYNTHIA-layout
source and a short run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import assert_same_weights
from typer.testing import CliRunner

from adapt_deploy.adapt.losses import class_masked_segmentation_loss, segmentation_loss
from adapt_deploy.cli import app
from adapt_deploy.config import DatasetConfig, from_dict, load_config
from adapt_deploy.data.datasets import source_classes
from adapt_deploy.data.fda import fda, swap_low_frequencies, window_half_width
from adapt_deploy.data.multi_source import MultiSourceDataset
from adapt_deploy.data.synthetic import render_image
from adapt_deploy.data.synthetic.writer import SynthSpec, synthia_size, write_benchmark
from adapt_deploy.data.synthia import synthia
from adapt_deploy.demo import demo_config, packaged_config
from adapt_deploy.engine.sampling import MultiSourceBatchSampler
from adapt_deploy.engine.source_style import TargetStyle
from adapt_deploy.engine.train import build_learner, train, train_step
from adapt_deploy.errors import ConfigError, UserError
from adapt_deploy.labels import IGNORE_INDEX, SYNTHIA_16_CLASSES

SYNTHIA_ABSENT = (9, 14, 16)  # terrain, truck, train


def sources(*entries: dict) -> dict:
    return {"data": {"sources": list(entries)}, "train": {"method": "multisource"}}


GTA = {"kind": "gta5", "root": "g", "size": [36, 64]}
SYN = {"kind": "synthia", "root": "s", "size": [38, 64]}


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (sources(GTA), r"'data\.sources' must be 2 or more entries"),
        ({**sources(GTA, SYN), "train": {"method": "adaptsegnet"}}, r"train\.method multisource"),
        (sources(GTA, {**SYN, "kind": "carla"}), r"'data\.sources\[1\]\.kind' must be one of"),
        (sources({**GTA, "size": [36]}, SYN), r"'data\.sources\[0\]\.size' must be"),
        (sources(GTA, {**SYN, "classes": [0, 19]}), r"'data\.sources\[1\]\.classes' must be"),
        (sources(GTA, {**SYN, "classes": [1, 1]}), r"'data\.sources\[1\]\.classes'"),
        (sources(GTA, {**SYN, "colour": 1}), r"unknown config key 'data\.sources\[1\]\.colour'"),
        (
            {**sources(GTA, SYN), "data": {"sources": [GTA, SYN], "source_mixing": "mix"}},
            r"'data\.sources\[\*\]\.size' must be the same for every source",
        ),
        (
            {
                "data": {"sources": [GTA, GTA], "source_mixing": "mix"},
                "train": {"method": "multisource", "batch_size": 3},
            },
            r"'train\.batch_size' must be a multiple of the 2 sources",
        ),
        ({"data": {"source_mixing": "shuffle"}}, r"'data\.source_mixing' must be one of"),
        ({"data": {"fda_beta": 0.5}}, r"'data\.fda_beta' must be in \[0, 0\.5\)"),
        ({"data": {"source": {"classes": [0]}}}, r"'data\.source\.classes' must be unset"),
    ],
)
def test_bad_multi_source_config_names_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw, source="ms.yaml")


def test_a_good_multi_source_config_loads():
    config = from_dict(sources(GTA, {**SYN, "classes": [0, 1, 2]}), source="ms.yaml")
    assert [s.kind for s in config.data.sources] == ["gta5", "synthia"]
    assert config.data.sources[1].classes == [0, 1, 2] and config.data.source_mixing == "alternate"


def test_multisource_without_sources_fails_before_anything_is_written(tmp_path, tiny_config_file):
    config = load_config(tiny_config_file, ["train.method=multisource"])
    with pytest.raises(ConfigError, match=r"set data\.sources to 2 or more"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- sampling -------------------------------------------------------------------------------


def source_of(index: int, sizes: list[int]) -> int:
    return int(np.searchsorted(np.cumsum(sizes), index, side="right"))


def take(sampler, count: int) -> list[list[int]]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("mixing", ["alternate", "mix"])
def test_both_mixings_draw_every_source_and_resume_exactly(mixing):
    sizes, batch = [5, 3, 4], 3
    full = take(MultiSourceBatchSampler(sizes, batch, 7, mixing), 20)
    per_source = [[source_of(i, sizes) for i in b] for b in full]
    if mixing == "alternate":  # iteration i: all of its batch from source i mod 3
        assert per_source == [[i % 3] * batch for i in range(20)]
    else:  # every batch: one image of each source
        assert all(sorted(s) == [0, 1, 2] for s in per_source)
    drawn = {i for b in full for i in b}
    assert drawn == set(range(sum(sizes)))  # every image of every source, within a few passes
    for start in (1, 7, 13):  # a resumed run sees the very batches the first run would have
        assert (
            take(MultiSourceBatchSampler(sizes, batch, 7, mixing, start), 20 - start)
            == full[start:]
        )
    assert take(MultiSourceBatchSampler(sizes, batch, 8, mixing), 20) != full  # seeded


@pytest.mark.parametrize("mixing", ["alternate", "mix"])
def test_process_shards_together_make_the_global_batch(mixing):
    sizes, batch = [6, 4], 4
    full = take(MultiSourceBatchSampler(sizes, batch, 0, mixing), 6)
    shards = [take(MultiSourceBatchSampler(sizes, batch, 0, mixing, 0, r, 2), 6) for r in (0, 1)]
    assert [a + b for a, b in zip(*shards, strict=True)] == full
    if mixing == "mix":  # each process sees both sources every iteration
        assert all({source_of(i, sizes) for i in s} == {0, 1} for s in shards[0])


def test_mix_refuses_a_process_share_that_misses_a_source():
    with pytest.raises(UserError, match="multiple of 4"):
        MultiSourceBatchSampler([3, 3], 2, 0, "mix", 0, 0, 2)


def test_each_source_is_drawn_in_permutations():
    sizes = [4, 6]
    batches = take(MultiSourceBatchSampler(sizes, 2, 3, "alternate"), 4)  # 2 passes of source 0
    from_first = [i for b in batches[0::2] for i in b]
    assert sorted(from_first) == [0, 1, 2, 3]


# --- class sets -----------------------------------------------------------------------------


def test_class_sets_come_from_the_layout_unless_overridden():
    assert source_classes(DatasetConfig("synthia", "s")) == SYNTHIA_16_CLASSES
    assert len(source_classes(DatasetConfig("synthia", "s"))) == 16
    assert source_classes(DatasetConfig("gta5", "g")) == tuple(range(19))
    assert source_classes(DatasetConfig("cityscapes", "c")) == tuple(range(19))
    assert source_classes(DatasetConfig("gta5", "g", classes=[0, 2])) == (0, 2)


def test_items_carry_their_source_and_its_classes():
    first = [{"image": torch.zeros(3, 2, 2), "label": torch.zeros(2, 2)}] * 2
    second = [{"image": torch.ones(3, 2, 2), "label": torch.zeros(2, 2)}] * 3
    data = MultiSourceDataset([first, second], [range(19), SYNTHIA_16_CLASSES], 19)
    assert len(data) == 5 and data.sizes == [2, 3]
    item = data[3]
    assert item["source"] == 1 and item["image"].sum() == 12
    assert item["classes"].sum() == 16 and not item["classes"][list(SYNTHIA_ABSENT)].any()
    assert data[1]["source"] == 0 and data[1]["classes"].all()


def test_a_class_a_source_lacks_gets_no_gradient_from_that_source():
    torch.manual_seed(0)
    logits = torch.randn(2, 19, 4, 8, requires_grad=True)
    labels = torch.randint(0, 19, (2, 8, 16))
    labels[:, :, :4] = IGNORE_INDEX
    labels[labels == 9] = 0  # the sources label no terrain pixel here
    classes = torch.ones(2, 19, dtype=torch.bool)
    classes[1, list(SYNTHIA_ABSENT)] = False  # image 1 is from a SYNTHIA-like source
    class_masked_segmentation_loss(logits, labels, classes).backward()
    masked = logits.grad.clone()
    assert torch.isfinite(masked).all()
    assert (masked[1, list(SYNTHIA_ABSENT)] == 0).all()  # nothing pushes them down
    assert (masked[0, 9] > 0).any()  # the 19-class image does push terrain down
    logits.grad = None
    segmentation_loss(logits, labels).backward()  # the unmasked loss would, on image 1 too
    assert (logits.grad[1, 9] > 0).any()
    # with every class labelled the loss is the plain one
    everything = torch.ones(2, 19, dtype=torch.bool)
    torch.testing.assert_close(
        class_masked_segmentation_loss(logits, labels, everything),
        segmentation_loss(logits, labels),
    )


def test_pixels_of_a_class_outside_the_set_are_ignored():
    logits = torch.randn(1, 19, 4, 4)
    labels = torch.full((1, 4, 4), 3)
    labels[0, 0] = 9
    classes = torch.ones(1, 19, dtype=torch.bool)
    classes[0, 9] = False
    only_threes = labels.clone()
    only_threes[0, 0] = IGNORE_INDEX
    torch.testing.assert_close(
        class_masked_segmentation_loss(logits, labels, classes),
        class_masked_segmentation_loss(logits, only_threes, classes),
    )


# --- discriminators -------------------------------------------------------------------------


def tiny_multisource(mixing: str = "alternate"):
    raw = {
        "data": {"sources": [GTA, {**GTA, "root": "h"}], "source_mixing": mixing},
        "model": {"backbone": "resnet18", "width": 8, "freeze_bn": False},
        "adapt": {"ndf": 4, "lambda_adv": 0.1, "lr_d": 0.01},
        "input": {"color_order": "RGB", "mean": [120.0] * 3, "std": [60.0] * 3},
        "train": {"method": "multisource", "batch_size": 2, "device": "cpu"},
    }
    return from_dict(raw)


def batch_of(sources: list[int]) -> dict:
    n = len(sources)
    classes = torch.ones(n, 19, dtype=torch.bool)
    return {
        "image": torch.randint(0, 256, (n, 3, 32, 64), dtype=torch.uint8),
        "label": torch.randint(0, 19, (n, 32, 64)),
        "source": torch.tensor(sources),
        "classes": classes,
    }


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_per_source_and_aggregate_discriminators_step_with_their_sources():
    torch.manual_seed(0)
    config = tiny_multisource()
    learner = build_learner(config, torch.device("cpu"))
    ds = learner.method.discriminators
    assert set(ds) == {"source0", "source1", "all"} and set(learner.d_optimizers) == set(ds)
    target = {"image": torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)}
    before = {k: snapshot(d) for k, d in ds.items()}
    metrics = train_step(learner, batch_of([1, 1]), target, config, 0)  # alternate: source 1
    assert {k for k in metrics if k.startswith("d_")} == {"d_source1", "d_all"}
    assert changed(before["source1"], ds["source1"]) and changed(before["all"], ds["all"])
    assert not changed(before["source0"], ds["source0"])  # not stepped this iteration
    assert math.isfinite(metrics["adv"]) and metrics["adv"] > 0
    before = {k: snapshot(d) for k, d in ds.items()}
    metrics = train_step(learner, batch_of([0, 1]), target, config, 1)  # mix: both
    assert {k for k in metrics if k.startswith("d_")} == {"d_source0", "d_source1", "d_all"}
    assert all(changed(before[k], d) for k, d in ds.items())


# --- FDA ------------------------------------------------------------------------------------


def test_fda_beta_zero_is_the_identity():
    source = torch.randint(0, 256, (2, 3, 20, 30), dtype=torch.uint8)
    target = torch.randint(0, 256, (2, 3, 24, 48), dtype=torch.uint8)
    assert fda(source, target, 0.0) is source
    assert swap_low_frequencies(source.float(), source.float(), 0.0).equal(source.float())


def spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))


def test_fda_takes_the_targets_low_frequency_amplitude_and_keeps_the_source_phase():
    gen = torch.Generator().manual_seed(0)
    source = torch.rand(3, 32, 48, generator=gen, dtype=torch.float64) * 255
    target = torch.rand(3, 32, 48, generator=gen, dtype=torch.float64) * 100 + 50
    beta = 0.1
    b = window_half_width(32, 48, beta)
    assert b == 3  # floor(0.1 * 32): a 7 x 7 window
    out = swap_low_frequencies(source, target, beta)
    s_out, s_src, s_tgt = spectrum(out), spectrum(source), spectrum(target)
    inside = torch.zeros(32, 48, dtype=torch.bool)
    inside[16 - b : 16 + b + 1, 24 - b : 24 + b + 1] = True
    torch.testing.assert_close(s_out.abs()[..., inside], s_tgt.abs()[..., inside])
    torch.testing.assert_close(s_out.abs()[..., ~inside], s_src.abs()[..., ~inside])
    unit = s_out / s_out.abs()  # the phase, as a unit complex number, is the source's everywhere
    torch.testing.assert_close(unit, s_src / s_src.abs())
    torch.testing.assert_close(out.mean(dim=(-2, -1)), target.mean(dim=(-2, -1)))  # DC swapped


def test_fda_on_batches_resizes_the_target_and_clips():
    source = torch.full((1, 3, 16, 24), 140, dtype=torch.uint8)
    source[..., :8, :] = 100
    target = torch.full((1, 3, 32, 32), 30, dtype=torch.uint8)
    out = fda(source, target, 0.05)  # b = 0: the mean colour alone is swapped
    assert out.dtype == torch.uint8 and out.shape == source.shape
    assert out[..., :8, :].eq(10).all() and out[..., 8:, :].eq(50).all()  # the edge is kept
    dark = fda(source, torch.zeros_like(target), 0.05)
    assert dark[..., :8, :].eq(0).all() and dark[..., 8:, :].eq(20).all()  # -20 clipped to 0
    torch.testing.assert_close(fda(source, target, 0.05), out)  # deterministic


def test_fda_target_draws_are_seeded_by_iteration_and_shard_independent():
    images = [{"image": torch.full((3, 8, 8), i, dtype=torch.uint8)} for i in range(50)]
    style = TargetStyle(images, 0.1, 3, 4, slice(0, 4), torch.device("cpu"))
    again = TargetStyle(images, 0.1, 3, 4, slice(0, 4), torch.device("cpu"))
    assert style.indices(5) == again.indices(5)
    assert [style.indices(i) for i in range(4)] != [style.indices(5)] * 4
    assert TargetStyle(images, 0.1, 4, 4, slice(0, 4), torch.device("cpu")).indices(5) != (
        style.indices(5)
    )
    halves = [
        TargetStyle(images, 0.1, 3, 4, s, torch.device("cpu")) for s in (slice(0, 2), slice(2, 4))
    ]
    assert halves[0].indices(5) + halves[1].indices(5) == style.indices(5)
    batch = {"image": torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "label": "kept"}
    styled = style(batch, 5)
    assert styled["label"] == "kept"
    means = styled["image"].float().mean(dim=(1, 2, 3)).round().tolist()
    assert means == [float(i) for i in style.indices(5)]  # each took its target's colour


# --- synthetic SYNTHIA-layout source --------------------------------------------------------

TINY = dict(
    num_source=4, num_target_train=4, num_target_val=2, num_videos=0,
    source_size=(72, 128), target_size=(64, 128),
)  # fmt: skip


def test_synth_sources_writes_a_synthia_layout_set_read_back_with_its_16_classes(tmp_path):
    result = CliRunner().invoke(
        app,
        ["synth", "--out", str(tmp_path), "--sources", "gta5,synthia", "--num-source", "4",
         "--num-target-train", "1", "--num-target-val", "1", "--num-videos", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "source" / "images").glob("*.png"))) == 4  # the GTA5 source too
    label_file = tmp_path / "synthia" / "GT" / "LABELS" / "0000000.png"
    raw = cv2.imread(str(label_file), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.ndim == 3  # 16-bit, class id in R (BGR index 2)
    dataset = synthia(tmp_path / "synthia")
    assert len(dataset) == 4
    height, width = synthia_size(SynthSpec())
    assert (height, width) == (304, 512)  # SYNTHIA's 1280x760 at the source's width
    seen = set()
    for i in range(4):
        label = dataset[i]["label"].numpy()
        seen |= set(np.unique(label).tolist())
        _, expected = render_image(0, "synthia", i, height, width)
        expected = np.where(np.isin(expected, SYNTHIA_16_CLASSES), expected, IGNORE_INDEX)
        assert np.array_equal(label, expected)
    assert seen <= set(SYNTHIA_16_CLASSES) | {IGNORE_INDEX} and len(seen) >= 8
    manifest = json.loads((tmp_path / "synth.json").read_text())
    assert manifest["spec"]["sources"] == ["gta5", "synthia"] and manifest["counts"]["synthia"] == 4


def test_synthia_style_draws_terrain_that_its_labels_leave_void():
    terrain = [(render_image(0, "synthia", i, 76, 128)[1] == 9).any() for i in range(12)]
    assert any(terrain)  # so the void in the labels is the layout's doing, not the scene's


def test_synth_refuses_an_unknown_source_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), "--sources", "gta5,carla"])
    assert result.exit_code != 0
    assert isinstance(result.exception, UserError)
    assert "carla" in str(result.exception) and "\n" not in str(result.exception)
    assert not any(tmp_path.iterdir())


def test_default_benchmark_manifest_has_no_sources_entry(tmp_path):
    manifest = write_benchmark(tmp_path, SynthSpec(**TINY), workers=1)
    assert "sources" not in manifest["spec"] and "synthia" not in manifest["counts"]
    assert not (tmp_path / "synthia").exists()


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_source_benchmark(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ms_bench")
    write_benchmark(out, SynthSpec(**TINY, sources=("gta5", "synthia")), workers=1)
    return out


def shipped_config(data: Path, *overrides: str):
    tiny = [
        f"data.source.root={data / 'source'}",
        f"data.sources=[{{kind: gta5, root: {data / 'source'}, size: [36, 64]}}, "
        f"{{kind: synthia, root: {data / 'synthia'}, size: [38, 64]}}]",
        f"data.target.root={data / 'target'}",
        f"data.val.root={data / 'target'}",
        "data.target.size=[32,64]",
        "data.val.size=[32,64]",
        "model.width=8",
        "adapt.ndf=4",
        "train.device=cpu",
        "train.log_every=1",
        *overrides,
    ]
    return load_config(packaged_config("synthetic/multisource.yaml"), tiny)


def test_the_demo_config_points_both_sources_at_the_demo_data(tmp_path):
    config = demo_config("multisource", tmp_path, ["train.iterations=5"])
    roots = [s.root for s in config.data.sources]
    assert roots == [str(tmp_path / "source"), str(tmp_path / "synthia")]
    assert [s.kind for s in config.data.sources] == ["gta5", "synthia"]
    assert config.data.sources[1].size == [152, 256] and config.train.iterations == 5


def test_a_short_multisource_run_writes_a_checkpoint_and_evaluates(
    tmp_path, two_source_benchmark, monkeypatch
):
    styled = []
    restyle = TargetStyle.__call__
    monkeypatch.setattr(
        TargetStyle, "__call__", lambda self, b, i: styled.append(i) or restyle(self, b, i)
    )
    config = shipped_config(two_source_benchmark, "train.iterations=3", "data.fda_beta=0.05")
    result = train(config, tmp_path / "run")
    assert styled == [0, 1, 2]  # FDA restyled every source batch
    assert result.checkpoint.is_file() and result.evaluation is not None
    assert 0 <= result.evaluation.miou <= 1
    assert json.loads((tmp_path / "run" / "eval.json").read_text())
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    keys = [set(r) for r in logged if "seg" in r]
    assert len(keys) == 3 and all({"seg", "adv", "d_all"} <= k for k in keys)
    assert "d_source0" in keys[0] and "d_source1" in keys[1]  # alternate: one source each


def test_fda_refuses_a_method_whose_labelled_batches_are_target_images(tmp_path, tiny_config_file):
    config = load_config(tiny_config_file, ["train.method=oracle", "data.fda_beta=0.05"])
    with pytest.raises(ConfigError, match=r"data\.fda_beta must be 0 for train\.method oracle"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_resumed_multisource_run_with_fda_is_exact(tmp_path, two_source_benchmark):
    common = ["optim.schedule_iters=8", "data.fda_beta=0.05", "data.source_mixing=mix"]
    common += [
        f"data.sources=[{{kind: gta5, root: {two_source_benchmark / 'source'}, size: [36, 64]}}, "
        f"{{kind: synthia, root: {two_source_benchmark / 'synthia'}, size: [36, 64]}}]"
    ]
    straight = shipped_config(two_source_benchmark, "train.iterations=4", *common)
    train(straight, tmp_path / "straight", evaluate_at_end=False)
    first = shipped_config(two_source_benchmark, "train.iterations=2", *common)
    train(first, tmp_path / "split", evaluate_at_end=False)
    train(straight, tmp_path / "split", resume=True, evaluate_at_end=False)
    assert_same_weights(tmp_path / "straight", tmp_path / "split")


def test_an_idle_discriminator_is_left_alone_under_fp16():
    """fp16's gradient scaler refuses to step an optimizer without gradients: the trainer
    leaves an idle discriminator's optimizer alone (its Adam state stays empty)."""
    torch.manual_seed(0)
    config = tiny_multisource()
    config.train.precision = "fp16"
    learner = build_learner(config, torch.device("cpu"))
    target = {"image": torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)}
    train_step(learner, batch_of([0, 0]), target, config, 0)
    assert not learner.d_optimizers["source1"].state and learner.d_optimizers["source0"].state

"""Foreign weights for model.init, convert-weights and evaluating released checkpoints.

State dicts are built here in each documented layout (docs/weights.md): the official DeepLab-v2 of
AdaptSegNet / ADVENT / weak-da-seg (written below from their key schema: stride on the first 1x1
conv, layer3/layer4 dilated 2/4, ceil-mode max pool, ASPP `conv2d_list` summing 2 or 4 branches),
torchvision ResNets and this project's checkpoints. Small widths keep every test in seconds.
"""

from __future__ import annotations

import argparse
import collections

import pytest
import torch
from legacy_torch_file import write_torch03_file
from torch import nn
from typer.testing import CliRunner

from adapt_deploy.cli import app
from adapt_deploy.config import ExperimentConfig, ModelConfig, load_config
from adapt_deploy.engine.evaluate import evaluate_checkpoint
from adapt_deploy.errors import ConfigError, UserError
from adapt_deploy.export.evaluate_bundle import evaluate_path
from adapt_deploy.models import weight_formats
from adapt_deploy.models.checkpoints import (
    build_model,
    checkpoint_meta,
    convert_weights,
    initial_weights,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from adapt_deploy.models.weight_formats import detect_format

WIDTH = 4
R50 = ModelConfig("resnet50", 19, WIDTH, True, 4)
R18 = ModelConfig("resnet18", 19, WIDTH, True, 4)
runner = CliRunner()


# --- the official DeepLab-v2 layout, from its documented key schema ---------------------------


class OfficialBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)  # stride on 1x1
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class OfficialClassifier(nn.Module):
    """`conv2d_list` of four dilated 3x3 convs; `summed` of them added (2: AdaptSegNet/WDA)."""

    def __init__(self, inplanes, num_classes, summed=4):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(inplanes, num_classes, 3, 1, d, d, bias=True) for d in (6, 12, 18, 24)
        )
        self.summed = summed

    def forward(self, x):
        return sum(conv(x) for conv in self.conv2d_list[: self.summed])


class OfficialDeepLab(nn.Module):
    """ResNetMulti of the releases: layer5 on layer3 (multi-level) and layer6 on layer4, or one
    `layer5` on layer4 (the single-level / MSCOCO-init layout)."""

    def __init__(self, layers, width, num_classes, multi_level=True, summed=4):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], dilation=2)
        self.layer4 = self._make_layer(width * 8, layers[3], dilation=4)
        self.multi_level = multi_level
        if multi_level:
            self.layer5 = OfficialClassifier(width * 16, num_classes, summed)
            self.layer6 = OfficialClassifier(width * 32, num_classes, summed)
        else:
            self.layer5 = OfficialClassifier(width * 32, num_classes, summed)

    def _make_layer(self, planes, blocks, stride=1, dilation=1):
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
        )
        stage = [OfficialBottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        stage += [OfficialBottleneck(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.layer4(x)
        return self.layer6(x) if self.multi_level else self.layer5(x)


def official(multi_level=True, summed=4, num_classes=19, seed=0) -> OfficialDeepLab:
    """A small official-layout ResNet-50 DeepLab-v2 with random weights and BN statistics."""
    torch.manual_seed(seed)
    net = OfficialDeepLab((3, 4, 6, 3), WIDTH, num_classes, multi_level, summed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.data.uniform_(-0.5, 0.5)
            m.running_var.data.uniform_(0.5, 1.5)
        if isinstance(m, nn.Conv2d):
            m.weight.data.normal_(0, 0.2)
    return net.eval()


def deeplab_v2_state(prefix="Scale.", drop_counters=True, **kwargs) -> dict[str, torch.Tensor]:
    """The state dict as released: `Scale.` or no prefix, without BN num_batches_tracked."""
    state = official(**kwargs).state_dict()
    return {prefix + k: v for k, v in state.items() if not (drop_counters and "num_batches" in k)}


def torchvision_state(arch: ModelConfig = R50) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict: our backbone's key names, plus `fc`."""
    torch.manual_seed(1)
    backbone = build_model(arch).backbone.state_dict()
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in backbone.items()}
    state["fc.weight"] = torch.randn(1000, backbone["layer4.2.bn3.weight"].shape[0])
    state["fc.bias"] = torch.randn(1000)
    return state


def save(tmp_path, obj, name="weights.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def init_weights(path, arch=R50, **fields):
    lines = []
    config = ModelConfig(arch.backbone, arch.num_classes, arch.width, True, arch.aspp_branches)
    config.init = str(path)
    for key, value in fields.items():
        setattr(config, key, value)
    return initial_weights(config, log=lines.append), lines


def ours(arch: ModelConfig, weights) -> nn.Module:
    model = build_model(arch)
    model.load_state_dict(weights, strict=False)
    return model.eval()


# --- the key test: same function after loading --------------------------------------------


@pytest.mark.parametrize(("summed", "multi_level"), [(4, True), (2, True), (4, False)])
def test_an_official_model_gives_the_same_logits_after_loading(tmp_path, summed, multi_level):
    net = official(multi_level, summed)
    path = save(tmp_path, {"Scale." + k: v for k, v in net.state_dict().items()})
    arch = ModelConfig("resnet50", 19, WIDTH, True, summed)
    weights, lines = init_weights(path, arch)
    x = torch.randn(1, 3, 41, 53) * 50
    with torch.no_grad():
        torch.testing.assert_close(ours(arch, weights)(x)["logits"], net(x), atol=1e-5, rtol=1e-4)
    assert "deeplab_v2" in lines[0] and "BGR" in lines[0]
    assert ("layer5" in lines[0]) == multi_level  # the auxiliary classifier is reported skipped


# --- the deeplab_v2 layout ----------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["Scale.", "", "module.", "module.Scale."])
def test_deeplab_v2_prefixes_all_load_the_same_tensors(tmp_path, prefix):
    state = deeplab_v2_state(prefix)
    weights, _ = init_weights(save(tmp_path, state))
    reference = official().state_dict()
    key = "layer1.0.downsample.1.running_mean"
    assert torch.equal(weights[f"backbone.{key}"], reference[key])
    assert torch.equal(weights["head.branches.3.weight"], reference["layer6.conv2d_list.3.weight"])
    assert not any(k.endswith("num_batches_tracked") for k in weights)  # old files lack them
    expected = {k for k in build_model(R50).state_dict() if "num_batches" not in k}
    assert set(weights) == expected


def _torch04_file(path, state):
    """PyTorch 0.4 to 1.5 (ADVENT's and weak-da-seg's releases): legacy layout, Python 3."""
    torch.save(collections.OrderedDict(state), path, _use_new_zipfile_serialization=False)
    return path


@pytest.mark.parametrize("write", [write_torch03_file, _torch04_file], ids=["0.3-py2", "0.4"])
def test_a_file_in_the_pre_zip_format_loads_with_the_same_logits(tmp_path, write):
    """The released files predate torch's zip format; 0.3's under Python 2 also use Python 2
    strings, the first `_rebuild_tensor` and an OrderedDict pickled as a list of pairs."""
    net = official(multi_level=True)
    released = {"Scale." + k: v for k, v in net.state_dict().items() if "num_batches" not in k}
    path = write(tmp_path / "DeepLab_resnet_pretrained.pth", released)
    raw = path.read_bytes()
    assert not raw.startswith(b"PK")  # not the zip format
    if write is write_torch03_file:
        assert b"_rebuild_tensor\n" in raw and b"U\x12Scale.conv1.weight" in raw
    weights, lines = init_weights(path)
    x = torch.randn(1, 3, 37, 45) * 50
    with torch.no_grad():
        torch.testing.assert_close(ours(R50, weights)(x)["logits"], net(x), atol=1e-5, rtol=1e-4)
    assert "deeplab_v2" in lines[0]
    convert_weights(path, tmp_path / "converted.pt", R50)
    model, _ = load_checkpoint(tmp_path / "converted.pt")
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logits"], net(x), atol=1e-5, rtol=1e-4)


def test_a_released_file_wrapped_under_state_dict_is_unwrapped(tmp_path):
    path = save(tmp_path, {"state_dict": deeplab_v2_state(), "iteration": 120000})
    weights, lines = init_weights(path)
    assert "head.branches.0.bias" in weights and "deeplab_v2" in lines[0]


def test_the_multi_level_auxiliary_classifier_is_skipped_and_reported(tmp_path):
    weights, lines = init_weights(save(tmp_path, deeplab_v2_state()))
    reference = official().state_dict()
    assert torch.equal(weights["head.branches.0.weight"], reference["layer6.conv2d_list.0.weight"])
    assert "layer5 (8 tensors" in lines[0] and "auxiliary" in lines[0]


def test_a_backbone_without_classifier_loads_and_the_head_keeps_its_init(tmp_path):
    state = {k: v for k, v in deeplab_v2_state("").items() if "conv2d_list" not in k}
    weights, lines = init_weights(save(tmp_path, state))
    assert not any(k.startswith("head.") for k in weights)
    assert "bare ResNet backbone" in lines[0] and "torchvision" in lines[0]  # said so
    assert "no classifier" in lines[0]


def test_the_mscoco_init_classifier_of_21_classes_is_skipped_not_an_error(tmp_path):
    state = deeplab_v2_state(multi_level=False, num_classes=21)
    weights, lines = init_weights(save(tmp_path, state))
    assert not any(k.startswith("head.") for k in weights)
    assert "backbone.layer4.2.bn3.running_var" in weights
    assert "21 classes" in lines[0] and "keeps its init" in lines[0]


# --- torchvision --------------------------------------------------------------------------------


def test_a_torchvision_resnet_loads_its_backbone_and_skips_fc(tmp_path):
    state = torchvision_state()
    weights, lines = init_weights(save(tmp_path, state))
    assert torch.equal(weights["backbone.conv1.weight"], state["conv1.weight"])
    assert not any(k.startswith(("head.", "fc.")) for k in weights)
    assert len(weights) == len(state) - 2
    assert "torchvision" in lines[0] and "fc.weight" in lines[0]
    assert "input.color_order=RGB" in lines[0] and "58.395" in lines[0]  # the normalization


def test_a_timm_deep_stem_fails_with_a_clear_mismatch(tmp_path):
    state = torchvision_state()
    del state["conv1.weight"]
    state["conv1.0.weight"] = torch.randn(WIDTH // 2, 3, 3, 3)
    state["conv1.3.weight"] = torch.randn(WIDTH, WIDTH // 2, 3, 3)
    with pytest.raises(UserError) as info:
        init_weights(save(tmp_path, state))
    message = str(info.value)
    assert "torchvision" in message and "deep stem" in message
    assert "backbone.conv1.weight" in message and "conv1.0.weight" in message


# --- strict and non-strict ------------------------------------------------------------------


def test_strict_names_the_format_and_the_first_differences(tmp_path):
    state = deeplab_v2_state()
    state["Scale.layer1.0.conv1.weight"] = torch.zeros(7, WIDTH, 1, 1)
    del state["Scale.layer2.0.bn1.running_mean"]
    state["Scale.layer7.weight"] = torch.zeros(1)
    with pytest.raises(UserError) as info:
        init_weights(save(tmp_path, state))
    message = str(info.value)
    assert "model.init" in message and "deeplab_v2" in message and "Scale." in message
    assert "Scale.layer1.0.conv1.weight: file (7, 4, 1, 1) vs model (4, 4, 1, 1)" in message
    assert "1 missing from the file (e.g. backbone.layer2.0.bn1.running_mean)" in message
    assert "1 in the file but not in the model (e.g. Scale.layer7.weight)" in message
    assert "model.init_strict=false" in message


def test_non_strict_loads_what_matches_and_lists_the_rest(tmp_path):
    state = deeplab_v2_state()
    state["Scale.layer1.0.conv1.weight"] = torch.zeros(7, WIDTH, 1, 1)
    del state["Scale.layer2.0.bn1.running_mean"]
    state["Scale.layer7.weight"] = torch.zeros(1)
    weights, lines = init_weights(save(tmp_path, state), init_strict=False)
    assert "backbone.layer1.0.conv1.weight" not in weights
    assert "backbone.layer1.0.bn1.weight" in weights and "head.branches.2.weight" in weights
    for skipped in ("1 with another shape", "Scale.layer7.weight", "layer2.0.bn1.running_mean"):
        assert skipped in lines[0]
    model = build_model(R50)
    model.load_state_dict(weights, strict=False)  # what the trainer does


def test_a_mismatched_width_lists_counts_and_a_few_keys(tmp_path):
    with pytest.raises(UserError, match=r"with another shape \(e\.g\. .*more\)"):
        init_weights(save(tmp_path, deeplab_v2_state()), ModelConfig("resnet50", 19, 8))


# --- this project's own files ---------------------------------------------------------------


def test_own_checkpoints_and_bare_state_dicts_still_load(tmp_path):
    model = build_model(R18)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, checkpoint_meta(ExperimentConfig(model=R18), 3))
    weights, lines = init_weights(path, R18)
    assert weights.keys() == model.state_dict().keys() and "adapt_deploy" in lines[0]
    bare, _ = init_weights(
        save(tmp_path, {"module." + k: v for k, v in model.state_dict().items()}), R18
    )
    assert all(torch.equal(bare[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match=r"model\.init.*with another shape"):
        init_weights(path, ModelConfig("resnet18", 19, 8))
    assert initial_weights(ModelConfig()) is None


# --- detection and refusal ------------------------------------------------------------------


def test_detection_from_the_keys():
    assert detect_format(["backbone.conv1.weight"])[0] == "adapt_deploy"
    assert detect_format(["conv1.weight", "fc.weight"])[0] == "torchvision"
    assert detect_format(["Scale.conv1.weight"])[0] == "deeplab_v2"
    assert detect_format(["conv1.weight", "layer6.conv2d_list.0.weight"])[0] == "deeplab_v2"
    with pytest.raises(UserError, match=r"encoder\.weight.*adapt_deploy.*torchvision"):
        detect_format(["encoder.weight", "decoder.bias"])


def test_a_named_format_overrides_detection(tmp_path):
    state = torchvision_state()
    path = save(tmp_path, {k: v for k, v in state.items() if not k.startswith("fc.")})
    _, lines = init_weights(path, init_format="torchvision")
    assert "format torchvision (as named)" in lines[0]


def test_an_unrecognizable_file_is_refused(tmp_path):
    path = save(tmp_path, {"encoder.weight": torch.zeros(1)})
    with pytest.raises(UserError, match=r"model\.init.*encoder\.weight.*deeplab_v2"):
        init_weights(path)


calls: list[str] = []


def _record() -> str:
    calls.append("ran")
    return "ran"


class Payload:
    def __reduce__(self):
        return (_record, ())


@pytest.mark.parametrize(
    "extra",
    [Payload(), argparse.Namespace(lr=2.5e-4), type("Ordered", (collections.OrderedDict,), {})],
)
def test_a_file_that_needs_code_is_refused_never_run(tmp_path, extra):
    if isinstance(extra, type):  # an OrderedDict subclass holding the tensors
        globals()["Ordered"] = extra
        extra.__module__ = __name__
        state = extra(deeplab_v2_state())
        obj = state
    else:
        obj = {"state_dict": deeplab_v2_state(), "args": extra}
    path = save(tmp_path, obj)
    with pytest.raises(UserError, match="not a weights-only checkpoint"):
        init_weights(path)
    assert calls == []


def test_config_validates_the_init_format(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    assert load_config(path, ["model.init_strict=false"]).model.init_strict is False
    with pytest.raises(ConfigError, match=r"model\.init_format"):
        load_config(path, ["model.init_format=caffe"])


# --- convert-weights and evaluating released checkpoints --------------------------------------


def test_convert_weights_writes_a_checkpoint_with_the_format_normalization(tmp_path):
    net = official(summed=2)
    src = save(tmp_path, {"Scale." + k: v for k, v in net.state_dict().items()})
    arch = ModelConfig("resnet50", 19, WIDTH, True, 2)
    lines = []
    convert_weights(src, tmp_path / "a.pt", arch, log=lines.append)
    model, config = load_checkpoint(tmp_path / "a.pt")
    x = torch.randn(1, 3, 33, 33) * 50
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logits"], net(x), atol=1e-5, rtol=1e-4)
    assert config.input.color_order == "BGR" and config.model.aspp_branches == 2
    assert read_checkpoint(tmp_path / "a.pt")["meta"]["converted_from"]["format"] == "deeplab_v2"
    assert "deeplab_v2" in lines[0]

    tv = save(tmp_path, torchvision_state(), "tv.pth")
    convert_weights(tv, tmp_path / "b.pt", R50)
    convert_weights(tv, tmp_path / "c.pt", R50)
    b, c = read_checkpoint(tmp_path / "b.pt"), read_checkpoint(tmp_path / "c.pt")
    assert b["meta"]["normalization"]["color_order"] == "RGB"
    assert b["meta"]["normalization"]["std"] == [58.395, 57.12, 57.375]
    assert torch.equal(b["model"]["head.branches.0.weight"], c["model"]["head.branches.0.weight"])


def test_evaluate_reads_a_released_checkpoint_with_arch(tmp_path, cityscapes_root):
    arch = ModelConfig("resnet18", 19, WIDTH, True, 4)
    torch.manual_seed(0)
    state = {k: v for k, v in build_model(arch).state_dict().items() if "num_batches" not in k}
    released = {}
    for key, value in state.items():  # this project's model written in the deeplab_v2 layout
        name = key.removeprefix("backbone.")
        name = name.replace("head.branches.", "layer6.conv2d_list.")
        released["Scale." + name] = value
    path = save(tmp_path, released, "GTA2Cityscapes.pth")
    result = evaluate_checkpoint(path, cityscapes_root, arch=arch)
    assert 0 <= result.miou <= 1
    with pytest.raises(UserError, match="--arch"):
        evaluate_path(path, cityscapes_root)  # a foreign file without --arch
    with pytest.raises(UserError, match="nothing to evaluate"):
        no_head = {k: v for k, v in released.items() if "conv2d_list" not in k}
        evaluate_checkpoint(save(tmp_path, no_head, "backbone.pth"), cityscapes_root, arch=arch)


def test_the_cli_converts_weights_and_evaluates_with_arch(tmp_path, monkeypatch, cityscapes_root):
    monkeypatch.setitem(weight_formats.ARCH_PRESETS, "tiny", ModelConfig("resnet50", 19, WIDTH))
    src = save(tmp_path, deeplab_v2_state())
    out = tmp_path / "converted.pt"
    result = runner.invoke(app, ["convert-weights", str(src), str(out), "--arch", "tiny"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "deeplab_v2" in result.output
    bad = runner.invoke(app, ["convert-weights", str(src), str(out), "--arch", "r7"])
    assert isinstance(bad.exception, UserError) and "deeplab_v2_r101" in str(bad.exception)
    wide = ["--arch", "deeplab_v2_r101"]
    strict = runner.invoke(app, ["convert-weights", str(src), str(tmp_path / "x.pt"), *wide])
    assert isinstance(strict.exception, UserError) and "with another shape" in str(strict.exception)
    assert not (tmp_path / "x.pt").exists()
    evaluated = runner.invoke(
        app, ["evaluate", str(src), "--data", str(cityscapes_root), "--arch", "tiny"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert "as tiny" in evaluated.output


def test_training_starts_from_the_mscoco_layout(tmp_path, tiny_config_file):
    """`model.init` of a DeepLab-v2 file through the trainer: the backbone starts from the file
    (lr 0 and frozen BN keep it), the 21-class classifier is skipped, the head keeps its init."""
    from adapt_deploy.engine.train import train

    state = deeplab_v2_state(multi_level=False, num_classes=21)
    path = save(tmp_path, state)
    settings = ["model.backbone=resnet50", f"model.width={WIDTH}", "model.freeze_bn=true"]
    settings += [f"model.init={path}", "train.iterations=1", "optim.lr=0.0", "optim.momentum=0.0"]
    result = train(load_config(tiny_config_file, settings), tmp_path / "run", False)
    weights = read_checkpoint(result.checkpoint)["model"]
    for key, value in state.items():
        if not key.startswith("Scale.layer5"):
            torch.testing.assert_close(weights["backbone." + key.removeprefix("Scale.")], value)
    assert weights["head.branches.0.weight"].shape[0] == 19

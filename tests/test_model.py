import pytest
import torch

from adapt_deploy.models import DeepLab
from adapt_deploy.models.resnet import RESNETS  # the backbones' one source: tests run over it


@pytest.mark.parametrize("backbone", list(RESNETS))
def test_full_width_feature_dimension(backbone):
    """A standard-width ResNet's last stage: 512 channels times the block's expansion
    (resnet18: 512; resnet50, resnet101: 2048)."""
    assert DeepLab(backbone, 19).feature_dim == 512 * RESNETS[backbone].block.expansion


@pytest.mark.parametrize("backbone", list(RESNETS))
@pytest.mark.parametrize(("height", "width"), [(64, 128), (97, 211)])
def test_outputs_are_at_one_eighth_resolution(backbone, height, width):
    model = DeepLab(backbone, 19, width=8).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width))
    # DeepLab-v2's ceil-mode max pool: ceil(ceil(H/2)/2 + 1/2) then the stride-2 stage.
    expected_h = ((height + 1) // 2 + 1) // 2 + 1
    expected_h = (expected_h - 1) // 2 + 1
    expected_w = (((width + 1) // 2 + 1) // 2 + 1 - 1) // 2 + 1
    assert out["logits"].shape == (2, 19, expected_h, expected_w)
    assert out["features"].shape == (2, model.feature_dim, expected_h, expected_w)
    assert abs(expected_h - height / 8) <= 1.5 and abs(expected_w - width / 8) <= 1.5


def test_frozen_batchnorm_stays_in_eval_mode_and_is_not_trained():
    model = DeepLab("resnet18", 19, width=8, freeze_bn=True).train()
    bns = model.batchnorms()
    assert bns and all(not bn.training for bn in bns)
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    before = bns[0].running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, bns[0].running_mean)


def test_trainable_batchnorm_when_not_frozen():
    model = DeepLab("resnet18", 19, width=8, freeze_bn=False).train()
    assert all(bn.training for bn in model.batchnorms())


def test_aspp_sums_the_requested_branches():
    model = DeepLab("resnet18", 5, width=8, aspp_branches=2).eval()
    x = torch.randn(1, model.feature_dim, 9, 9)
    expected = model.head.branches[0](x) + model.head.branches[1](x)
    torch.testing.assert_close(model.head(x), expected)
    assert [c.dilation[0] for c in model.head.branches] == [6, 12, 18, 24]


def test_head_and_backbone_parameter_groups_cover_the_trainable_parameters():
    model = DeepLab("resnet18", 19, width=8, freeze_bn=True)
    backbone, head = model.parameter_groups()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(backbone) + len(head) == len(trainable) and len(head) == 8


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError, match="resnet101"):
        DeepLab("vgg16")


@pytest.mark.parametrize("backbone", list(RESNETS))
def test_a_config_builds_every_backbone(backbone):
    from adapt_deploy.config import from_dict
    from adapt_deploy.models.checkpoints import build_model

    config = from_dict({"model": {"backbone": backbone, "width": 8}})
    assert isinstance(build_model(config.model), DeepLab)

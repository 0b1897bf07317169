"""The discriminators: shapes, and the batched category MLPs against the official class loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapt_deploy.models.discriminators import CategoryDiscriminators, FCDiscriminator


def loop_forward(models: nn.ModuleList, pooled: torch.Tensor) -> torch.Tensor:
    """weak-da-seg's CWDiscriminator.forward, on (N, C, D) input."""
    return torch.stack([m(pooled[:, c]) for c, m in enumerate(models)]).squeeze(-1).t()


def test_fc_discriminator_output_size_for_65x129() -> None:
    d = FCDiscriminator(num_classes=19, ndf=8)
    out = d(torch.softmax(torch.randn(2, 19, 65, 129), dim=1))
    # Five 4x4/2/1 convs: 65 -> 32 -> 16 -> 8 -> 4 -> 2 and 129 -> 64 -> 32 -> 16 -> 8 -> 4.
    assert out.shape == (2, 1, 2, 4)


def test_fc_discriminator_layers_match_adaptsegnet() -> None:
    d = FCDiscriminator(num_classes=19)
    convs = [d.conv1, d.conv2, d.conv3, d.conv4, d.classifier]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (19, 64),
        (64, 128),
        (128, 256),
        (256, 512),
        (512, 1),
    ]
    assert all(
        c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs
    )


def test_category_discriminators_shapes_and_parameters() -> None:
    d = CategoryDiscriminators(num_classes=5, in_dim=12, hidden=7)
    assert d(torch.randn(3, 5, 12)).shape == (3, 5)
    assert d.weight1.shape == (5, 12, 7) and d.weight2.shape == (5, 7, 7)
    assert d.weight3.shape == (5, 7, 1) and d.bias3.shape == (5, 1)
    per_class = sum(p.numel() for p in d.to_sequentials()[0].parameters())
    assert sum(p.numel() for p in d.parameters()) == 5 * per_class
    with pytest.raises(ValueError, match="pooled features"):
        d(torch.randn(3, 12, 5))


def test_category_discriminators_equal_the_official_class_loop() -> None:
    torch.manual_seed(0)
    d = CategoryDiscriminators(num_classes=4, in_dim=16, hidden=8)
    models = d.to_sequentials()
    x = torch.randn(3, 4, 16, requires_grad=True)
    x_loop = x.detach().clone().requires_grad_(True)
    out, out_loop = d(x), loop_forward(models, x_loop)
    torch.testing.assert_close(out, out_loop, atol=1e-5, rtol=1e-5)

    weights = torch.randn(3, 4)
    (out * weights).sum().backward()
    (out_loop * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_loop.grad, atol=1e-5, rtol=1e-5)
    for c, mlp in enumerate(models):
        linears = [m for m in mlp if isinstance(m, nn.Linear)]
        for linear, (weight, bias) in zip(linears, d.layers(), strict=True):
            torch.testing.assert_close(weight.grad[c].t(), linear.weight.grad, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(bias.grad[c], linear.bias.grad, atol=1e-5, rtol=1e-5)


def test_category_discriminators_round_trip_through_the_official_layout() -> None:
    torch.manual_seed(1)
    models = nn.ModuleList(
        nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 1))
        for _ in range(3)
    )
    d = CategoryDiscriminators.from_sequentials(models)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(d(x), loop_forward(models, x), atol=1e-6, rtol=1e-6)

    # A weak-da-seg checkpoint (DataParallel prefix included) loads into the stacked layout.
    official = {f"module.models.{k}": v for k, v in models.state_dict().items()}
    loaded = CategoryDiscriminators(num_classes=3, in_dim=6, hidden=5)
    loaded.load_official_state_dict(official)
    torch.testing.assert_close(loaded(x), d(x))
    with pytest.raises(KeyError, match="missing"):
        loaded.load_official_state_dict({"models.0.0.weight": models[0][0].weight})


def test_category_discriminators_init_matches_nn_linear_bounds() -> None:
    torch.manual_seed(2)
    d = CategoryDiscriminators(num_classes=2, in_dim=64, hidden=32)
    for weight, bias in d.layers():
        bound = weight.shape[1] ** -0.5
        assert weight.abs().max() <= bound and bias.abs().max() <= bound
        assert weight.abs().max() > 0.9 * bound  # spread over the whole interval

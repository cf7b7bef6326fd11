"""Projectors: exact sizes, checkpoint key names, pixel-shuffle order, width checks."""

import pytest
import torch
from torch import nn
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

from vlakit import projectors as P


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_linear_projector_paligemma_size_and_keys():
    with torch.device("meta"):
        proj = P.LinearProjector(1152, 2048)
    assert n_params(proj) == 2_361_344
    assert set(proj.state_dict()) == {"linear.weight", "linear.bias"}
    assert (proj.in_dim, proj.out_dim) == (1152, 2048)


def test_mlp_projector_openvla_size_keys_and_structure():
    with torch.device("meta"):
        proj = P.MLPProjector([2176, 8704, 4096, 4096])
    assert n_params(proj) == 71_385_600
    assert [k for k in proj.state_dict()] == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "fc3.weight",
        "fc3.bias",
    ]
    small = P.MLPProjector([6, 5, 4, 3])
    x = torch.randn(2, 7, 6)
    expected = small.fc3(nn.functional.gelu(small.fc2(nn.functional.gelu(small.fc1(x)))))
    torch.testing.assert_close(small(x), expected)
    assert P.MLPProjector([6, 3]).num_layers == 1
    with pytest.raises(ValueError, match="at least"):
        P.MLPProjector([6])


def test_mlp_projector_loads_openvla_projector_keys():
    shapes = {1: (8, 6), 2: (5, 8), 3: (4, 5)}
    src = {}
    for i, (out_dim, in_dim) in shapes.items():
        src[f"projector.fc{i}.weight"] = torch.randn(out_dim, in_dim)
        src[f"projector.fc{i}.bias"] = torch.randn(out_dim)
    proj = P.MLPProjector([6, 8, 5, 4])
    proj.load_state_dict({k.removeprefix("projector."): v for k, v in src.items()}, strict=True)
    torch.testing.assert_close(proj.fc2.weight, src["projector.fc2.weight"])


def test_proprio_projector_oft_size():
    with torch.device("meta"):
        proj = P.ProprioProjector(8, 4096)
    assert n_params(proj) == 16_818_176
    assert set(proj.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    small = P.ProprioProjector(3, 5)
    assert small(torch.randn(2, 3)).shape == (2, 5)
    assert small(torch.randn(2, 1, 3)).shape == (2, 1, 5)


@pytest.mark.parametrize("factor", [2, 3])
def test_pixel_shuffle_matches_transformers_order(factor):
    x = torch.randn(2, 36, 5)  # 6x6 grid
    ours = P.pixel_shuffle(x, factor)
    assert ours.shape == (2, 36 // factor**2, 5 * factor**2)
    # transformers' own implementation (the method ignores self's state)
    torch.testing.assert_close(ours, Idefics3Connector.pixel_shuffle(None, x, factor))
    torch.testing.assert_close(ours, SmolVLMConnector.pixel_shuffle(None, x, factor))


def test_pixel_shuffle_projector():
    proj = P.PixelShuffleProjector(5, 7, factor=2)
    assert proj.proj.bias is None and proj.proj.in_features == 20
    x = torch.randn(2, 16, 5)
    torch.testing.assert_close(proj(x), proj.proj(P.pixel_shuffle(x, 2)))
    assert proj(x).shape == (2, 4, 7)
    with pytest.raises(ValueError, match="square token grid, got 15"):
        proj(torch.randn(1, 15, 5))
    with pytest.raises(ValueError, match="grid side 3 is not divisible by the shuffle factor 2"):
        proj(torch.randn(1, 9, 5))


@pytest.mark.parametrize(
    "proj",
    [
        P.LinearProjector(6, 4),
        P.MLPProjector([6, 8, 4]),
        P.PixelShuffleProjector(6, 4, 2),
        P.ProprioProjector(6, 4),
    ],
    ids=["linear", "mlp", "pixel_shuffle", "proprio"],
)
def test_every_projector_names_expected_and_actual_width(proj):
    with pytest.raises(ValueError, match="expects input width 6, got 5"):
        proj(torch.randn(1, 4, 5))
    assert (proj.in_dim, proj.out_dim) == (6, 4)

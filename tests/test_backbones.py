"""The backbone adapter: the stride it reports is the stride it has, in 2D and 3D."""
from __future__ import annotations

import pytest
import torch

from mlmi_zoo.architectures.blocks.backbones import create_backbone, latent_to_input


@pytest.mark.parametrize("spatial_dims, size", [(2, 64), (3, 32)])
@pytest.mark.parametrize("feature_stride", [4, 8, 16])
def test_reported_stride_is_real(spatial_dims: int, size: int, feature_stride: int) -> None:
    backbone = create_backbone("resnet8", 1, spatial_dims, feature_stride)
    out = backbone(torch.rand(1, 1, *([size] * spatial_dims)))
    assert backbone.stride == feature_stride
    assert tuple(out.shape[2:]) == (size // feature_stride,) * spatial_dims
    assert out.shape[1] == backbone.out_channels


def test_any_channel_count_and_non_square() -> None:
    backbone = create_backbone("resnet8", 5, 2, 8)
    assert backbone(torch.rand(2, 5, 48, 40)).shape[2:] == (6, 5)


def test_unknown_and_2d_only_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("no_such_net", 1, 2)
    with pytest.raises(ValueError, match="no 3D version"):
        create_backbone("mobilenetv3_small_050", 1, 3)


@pytest.mark.parametrize("dims,size", [(2, (64, 48)), (3, (32, 32, 32))])
def test_declared_offset_is_the_receptive_field_centre(dims: int, size: tuple[int, ...]) -> None:
    """Cell i's gradient centroid in the input lies within 1 px of offset + stride * i on every axis."""
    torch.manual_seed(0)
    bb = create_backbone("resnet8", 1, dims, 8).eval()
    x = torch.randn(1, 1, *size, requires_grad=True)
    z = bb(x)
    cell = tuple(n // 2 for n in z.shape[2:])
    z[(0, slice(None), *cell)].sum().backward()
    g = x.grad[0, 0].abs()
    for axis, i in enumerate(cell):
        coords = torch.arange(size[axis], dtype=torch.float32).view([-1 if k == axis else 1 for k in range(dims)])
        centroid = float((g * coords).sum() / g.sum())
        assert abs(centroid - (bb.offset + bb.stride * i)) <= 1.0, (axis, centroid)


def test_latent_to_input_places_cells_on_their_centres() -> None:
    maps = torch.zeros(1, 1, 8, 6)
    maps[0, 0, 5, 2] = 1.0
    up = latent_to_input(maps, (64, 48), stride=8, offset=0.0)
    assert up.shape == (1, 1, 64, 48)
    assert divmod(int(up.flatten().argmax()), 48) == (40, 16)
    assert float(up.max()) == pytest.approx(1.0)
    const = latent_to_input(torch.full((2, 3, 4, 4, 4), 2.5), (32, 32, 32), stride=8, offset=0.0)
    assert torch.allclose(const, torch.full_like(const, 2.5))  # weights sum to one, borders held
    ref = torch.nn.functional.interpolate(maps, size=(64, 48), mode="bilinear", align_corners=False)
    assert torch.equal(latent_to_input(maps, (64, 48), 8, None), ref)
    with pytest.raises(ValueError, match="spatial axes"):
        latent_to_input(torch.zeros(1, 1, 8), (64,), 8, 0.0)


def test_cell_fraction_is_the_mask_share_of_the_window_centred_on_each_cell() -> None:
    bb = create_backbone("resnet8", 1, 2, 8)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 1, 40, 24, generator=g) > 0.6
    got = bb.cell_fraction(mask, (5, 3))
    expect = torch.zeros(2, 1, 5, 3)
    for i in range(5):
        for j in range(3):
            window = mask[:, :, max(0, 8 * i - 4):8 * i + 4, max(0, 8 * j - 4):8 * j + 4]
            expect[:, :, i, j] = window.float().sum((2, 3)) / 64.0  # pixels outside the image count as off
    assert torch.allclose(got, expect)

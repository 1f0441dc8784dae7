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


def test_tiled_backbone_encodes_each_tile_on_its_own() -> None:
    """A tiled backbone's cell (i, j) is the network's mean feature of that tile alone; the rows and
    columns past the last whole tile are never read; its geometry is the tile grid."""
    torch.manual_seed(0)
    plain = create_backbone("resnet8", 3, 2, 8).eval()
    tiled = create_backbone("resnet8", 3, 2, 8, tile=16).eval()
    tiled.load_state_dict(plain.state_dict())  # same parameter names: weights map one to one
    tiled.chunk = 5  # chunking changes nothing
    x = torch.rand(2, 3, 40, 70)
    z = tiled(x)
    assert tuple(z.shape) == (2, plain.out_channels, 2, 4)
    assert (tiled.stride, tiled.offset, tiled.cut_stride, tiled.tile) == (16, 7.5, 8, 16)
    alone = plain(x[1:, :, 16:32, 48:64]).mean(dim=(-2, -1))[0]
    assert torch.allclose(z[1, :, 1, 3], alone, atol=1e-5)
    y = x.clone()
    y[:, :, 32:] = 0.0  # rows 32..39 and columns 64..69 lie in no tile
    y[:, :, :, 64:] = 0.0
    assert torch.equal(tiled(y), z)
    share = tiled.cell_fraction((torch.arange(70) < 24).float().expand(1, 1, 40, 70), (2, 4))
    assert share[0, 0, 0].tolist() == [1.0, 0.5, 0.0, 0.0]


def test_tiled_receptive_field_stays_in_the_tile() -> None:
    from mlmi_zoo.architectures.protopnet.fields import cell_fields
    import mlmi_zoo

    model = mlmi_zoo.create_model("protopnet_resnet8", label_names=("a", "b"), in_channels=3, img_size=(48, 80),
                                  feature_stride=8, tile_px=16, prototypes_per_class=1).eval()
    fields = cell_fields(model, torch.rand(3, 48, 80), (1, 2))
    (r0, r1), (c0, c1) = fields["theoretical_px"]
    assert 16 <= r0 < r1 <= 32 and 32 <= c0 < c1 <= 48  # never past its own tile
    assert r1 - r0 >= 12 and c1 - c0 >= 12  # (a stride-2 convolution reads the tile's last pixel at no output)


def test_tile_settings_are_checked() -> None:
    import mlmi_zoo

    with pytest.raises(ValueError, match="2D image"):
        create_backbone("resnet8", 1, 3, 8, tile=16)
    with pytest.raises(ValueError, match="at least the network's stride"):
        create_backbone("resnet8", 1, 2, 16, tile=8)
    with pytest.raises(ValueError, match="smaller than one"):
        create_backbone("resnet8", 1, 2, 8, tile=32)(torch.rand(1, 1, 20, 64))
    with pytest.raises(ValueError, match="tile_px"):
        mlmi_zoo.create_model("protopnet_resnet8", label_names=("a", "b"), in_channels=1, img_size=(32, 32),
                              feature_stride=8, tile_px=4)

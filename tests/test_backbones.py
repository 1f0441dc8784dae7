"""The backbone adapter: the stride it reports is the stride it has, in 2D and 3D."""
from __future__ import annotations

import pytest
import torch

from mlmi_zoo.architectures.backbones import create_backbone


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

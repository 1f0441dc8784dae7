"""One adapter for every feature extractor: timm in 2D, MONAI in 3D, random initialisation.

``create_backbone(name, in_channels, spatial_dims, feature_stride)`` returns a module mapping
``(B, C, *spatial)`` to a feature map ``(B, F, *latent)`` together with ``F`` and the stride.
``feature_stride`` cuts the network after the deepest stage whose reduction does not exceed it,
so small medical patches (28–64 px) keep a latent grid fine enough to localise evidence.

``tile`` instead encodes the image as independent, non-overlapping square tiles
(:class:`TiledBackbone`): each tile goes through the cut network on its own and is averaged to one
latent cell, so the latent grid is the tile grid and a cell's true receptive field is exactly its
tile, however deep the network. A deep ImageNet network then gives semantic features whose cells
still see only a small part of a large photograph, which a convolutional cut cannot give: on
EfficientNet-Lite0 the stride-8 cut sees 67 px but carries low-level features, and each deeper
stage widens the field well beyond its stride. Cutting an image into tiles is a reshape; no library
builds a backbone from it, hence the wrapper.

ResNet names (``resnet8``, ``resnet10``, ``resnet18``, ``resnet34``) exist in 2D (timm's ResNet)
and 3D (MONAI's ResNet) with the same stage layout. ``resnet8`` is a small variant for 28–64 px
inputs and tests: one basic block per stage, widths 16-32-64-128. Any other timm model name works
in 2D. A timm model is cut with its own ``prune_intermediate_layers`` (the stages after the cut are
removed, so they neither run nor hold parameters) and read with ``forward_intermediates``; models
without that interface go through ``features_only``. Models start from random init or from zoo
weights; a timm backbone can instead start from pretrained weights (``init``, see :mod:`.pretrained`),
which timm loads before the network is cut, and the backbone then records their provenance and
input normalisation. Parameter names are timm's own (``conv_stem``, ``blocks.0``, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from mlmi_zoo.architectures.blocks.pretrained import WeightsProvenance, resolve_init

if TYPE_CHECKING:  # timm is imported lazily, when a timm backbone is built
    from timm.models import FeatureInfo

__all__ = ["create_backbone", "Backbone", "TiledBackbone", "RESNET_LAYOUTS", "latent_to_input"]

# name -> (blocks per stage, stage widths)
RESNET_LAYOUTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "resnet8": ((1, 1, 1, 1), (16, 32, 64, 128)),
    "resnet10": ((1, 1, 1, 1), (64, 128, 256, 512)),
    "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34": ((3, 4, 6, 3), (64, 128, 256, 512)),
}
STAGE_REDUCTION = (4, 8, 16, 32)  # after layer1..layer4 (stem conv stride 2 + max-pool stride 2)


@dataclass(frozen=True)
class BackboneInfo:
    """Output width, total stride, and where latent cell 0 looks (see :class:`Backbone`)."""

    out_channels: int
    stride: int
    offset: float | None = None
    provenance: WeightsProvenance | None = None  # None: random initialisation


class Backbone(nn.Module):
    """A feature extractor cut at a given stage. ``forward(x)`` -> ``(B, F, *latent)``.

    Attributes:
        out_channels: ``F``.
        stride: total down-sampling from input pixels to latent cells.
        offset: input-pixel coordinate (0 = the first pixel's centre) of the receptive-field centre
            of latent cell 0, so cell ``i`` is centred on pixel ``offset + stride * i``; ``None`` when
            the architecture's padding is not known, in which case maps are resampled as if each
            cell covered its share of the input (``F.interpolate`` with ``align_corners=False``).
        provenance: where the initial weights came from and the input normalisation they expect
            (feed ``(x - mean) / std`` per channel); ``None`` for random initialisation.
        cut_stride: the ``feature_stride`` the network was cut at (``stride`` itself, except for a
            :class:`TiledBackbone`).
        tile: the tile side of a :class:`TiledBackbone`, else ``None``.
    """

    tile: int | None = None

    def __init__(self, body: nn.Module, info: BackboneInfo, list_output: bool = False,
                 intermediate: int | None = None) -> None:
        super().__init__()
        self.body = body
        self.out_channels = info.out_channels
        self.stride = info.stride
        self.offset = info.offset
        self.provenance = info.provenance
        self._list_output = list_output
        self._intermediate = intermediate  # a pruned timm model: read this feature index
        self.cut_stride = info.stride
        self.build_args: dict[str, Any] = {}  # create_backbone's arguments, set by it (pretrained_state)

    def pretrained_state(self, init: str) -> dict[str, torch.Tensor]:
        """The state dict of this backbone as ``create_backbone`` builds it started from ``init``
        (e.g. ``"imagenet"``): what a frozen pretrained backbone holds, rebuilt from its source.

        Raises:
            ValueError: for a backbone not built by :func:`create_backbone`, or an ``init`` it cannot take.
            MissingExtraError: ``init="imagenet"`` for an EfficientNet-Lite without the ``pretrained`` extra.
        """
        if not self.build_args:
            raise ValueError("this backbone was not built by create_backbone; its pretrained state is unknown")
        with torch.random.fork_rng(devices=[]):  # timm initialises the copy randomly before loading into it
            return create_backbone(**self.build_args, init=init).state_dict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._intermediate is not None:
            body: Any = self.body  # a timm model with the forward_intermediates interface
            return body.forward_intermediates(x, indices=[self._intermediate], intermediates_only=True,
                                              stop_early=True)[-1]
        feats = self.body(x)
        return feats[-1] if self._list_output else feats

    def cell_fraction(self, mask: torch.Tensor, latent_shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Share of each latent cell's window that lies on a mask: ``(B, 1, *spatial)`` -> ``(B, 1, *latent)``.

        The window of cell ``i`` is the ``stride``-wide box centred on its receptive-field centre,
        ``[offset + stride*i - stride/2, offset + stride*i + stride/2)`` per axis (pixels outside the
        image count as off the mask). Without a known integer offset in ``[0, stride/2]`` and an even
        stride, the cell's share of the input is used instead (adaptive average pooling).
        """
        latent_shape = tuple(int(n) for n in latent_shape)
        dims = len(latent_shape)
        mask = mask.float()
        if self.offset is None or self.offset != int(self.offset) or self.stride % 2 or not 0 <= self.offset <= self.stride // 2:
            if dims == 2:
                h, w = latent_shape
                return F.adaptive_avg_pool2d(mask, (h, w))
            d, h, w = latent_shape
            return F.adaptive_avg_pool3d(mask, (d, h, w))
        half, shift = self.stride // 2, int(self.offset)
        # pad so that pooling window i starts at pixel offset + stride*i - stride/2
        pad: list[int] = []
        for n_in, n_lat in zip(reversed(mask.shape[2:]), reversed(latent_shape)):
            before = half - shift
            pad += [before, max(0, n_lat * self.stride - (n_in + before))]
        padded = F.pad(mask, pad)
        pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
        out = pool(padded, kernel_size=self.stride, stride=self.stride)
        return out[(slice(None), slice(None), *(slice(0, n) for n in latent_shape))]

    def to_input(self, maps: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Resample latent maps ``(B, K, *latent)`` to input pixels ``(B, K, *size)``; see :func:`latent_to_input`."""
        return latent_to_input(maps, size, self.stride, self.offset)


class TiledBackbone(Backbone):
    """A backbone run on independent, non-overlapping ``tile`` x ``tile`` tiles of the image (2D).

    ``forward`` cuts ``(B, C, H, W)`` into ``floor(H / tile) x floor(W / tile)`` tiles (the last
    ``H mod tile`` rows and ``W mod tile`` columns belong to no tile and are never read), runs every
    tile through the cut network in chunks of ``chunk`` tiles, and averages each tile's feature map
    to one vector: ``(B, F, H // tile, W // tile)``. Cell ``(i, j)`` depends on the pixels of rows
    ``[i * tile, (i + 1) * tile)`` and columns ``[j * tile, (j + 1) * tile)`` only, so
    ``stride = tile`` and ``offset = (tile - 1) / 2``, the centre of the first tile.

    Args:
        body, info: as for :class:`Backbone`, with ``info.stride`` the cut network's own stride.
        tile: tile side in pixels.
        chunk: tiles per pass of the network (bounds activation memory; the result does not depend on it).
    """

    def __init__(self, body: nn.Module, info: BackboneInfo, tile: int, list_output: bool = False,
                 intermediate: int | None = None, chunk: int = 512) -> None:
        if tile < info.stride:
            raise ValueError(f"tile ({tile} px) must be at least the network's stride ({info.stride})")
        super().__init__(body, BackboneInfo(info.out_channels, tile, (tile - 1) / 2, info.provenance),
                         list_output=list_output, intermediate=intermediate)
        self.cut_stride = info.stride
        self.tile = tile
        self._side = tile  # the same, typed int
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"a tiled backbone takes 2D images (B, C, H, W), got {tuple(x.shape)}")
        t = self._side
        b, c, h, w = x.shape[0], x.shape[1], x.shape[2] // t, x.shape[3] // t
        if h == 0 or w == 0:
            raise ValueError(f"the image ({x.shape[2]} x {x.shape[3]} px) is smaller than one {t}-px tile")
        tiles = (x[:, :, :h * t, :w * t].reshape(b, c, h, t, w, t)
                 .permute(0, 2, 4, 1, 3, 5).reshape(b * h * w, c, t, t))  # (B*h*w, C, t, t), row-major tiles
        feats = torch.cat([super(TiledBackbone, self).forward(tiles[i:i + self.chunk]).mean(dim=(-2, -1))
                           for i in range(0, tiles.shape[0], self.chunk)])  # (B*h*w, F)
        return feats.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, F, h, w)

    def cell_fraction(self, mask: torch.Tensor, latent_shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Share of each tile that lies on a mask: ``(B, 1, H, W)`` -> ``(B, 1, *latent)``."""
        t = self._side
        h, w = (int(n) for n in latent_shape)
        return F.avg_pool2d(mask.float()[..., :h * t, :w * t], kernel_size=t, stride=t)


def _interpolation_matrix(n_in: int, n_latent: int, stride: int, offset: float, like: torch.Tensor) -> torch.Tensor:
    """``(n_in, n_latent)`` linear-interpolation weights: pixel ``p`` reads latent ``(p - offset) / stride``."""
    u = ((torch.arange(n_in, dtype=torch.float64) - offset) / stride).clamp(0, n_latent - 1)
    i0 = u.floor().long()
    w = u - i0
    i1 = (i0 + 1).clamp(max=n_latent - 1)
    a = torch.zeros(n_in, n_latent, dtype=torch.float64)
    rows = torch.arange(n_in)
    a.index_put_((rows, i0), 1.0 - w, accumulate=True)
    a.index_put_((rows, i1), w, accumulate=True)
    return a.to(dtype=like.dtype, device=like.device)


def latent_to_input(maps: torch.Tensor, size: tuple[int, ...] | torch.Size, stride: int,
                    offset: float | None) -> torch.Tensor:
    """Resample latent maps to input resolution, each cell's value placed on its receptive-field centre.

    Linear (bi-/tri-linear) interpolation between cell centres at input pixels ``offset + stride * i``,
    held constant beyond the first and last centre. This registers a map with the image it explains:
    a ResNet's cell ``i`` is centred on pixel ``stride * i`` (every strided convolution and pooling has
    padding ``(k - 1) / 2``), whereas ``F.interpolate(..., align_corners=False)`` would draw it at
    ``stride * i + (stride - 1) / 2``, 3.5 px too far right and down at stride 8.

    Args:
        maps: ``(B, K, *latent)`` with 2 or 3 spatial axes.
        size: input spatial size.
        stride: total stride of the latent grid.
        offset: input-pixel coordinate of cell 0's centre; ``None`` falls back to
            ``F.interpolate(..., align_corners=False)``.

    Returns:
        ``(B, K, *size)`` maps.
    """
    size = tuple(int(n) for n in size)
    dims = maps.ndim - 2
    if dims not in (2, 3) or len(size) != dims:
        raise ValueError(f"maps must be (B, K, *latent) with 2 or 3 spatial axes matching size {size}; got {tuple(maps.shape)}")
    if offset is None or not math.isfinite(offset):
        return F.interpolate(maps, size=size, mode="bilinear" if dims == 2 else "trilinear", align_corners=False)
    mats = [_interpolation_matrix(n, m, stride, float(offset), maps) for n, m in zip(size, maps.shape[2:])]
    if dims == 2:
        return torch.einsum("bkij,yi,xj->bkyx", maps, *mats)
    return torch.einsum("bkijl,zi,yj,xl->bkzyx", maps, *mats)


def _stages_for(feature_stride: int) -> int:
    if feature_stride < STAGE_REDUCTION[0]:
        raise ValueError(f"feature_stride must be >= {STAGE_REDUCTION[0]} for ResNet backbones, got {feature_stride}")
    return sum(r <= feature_stride for r in STAGE_REDUCTION)


def _resnet_body(name: str, in_channels: int, spatial_dims: int, n_stages: int) -> tuple[nn.Module, int]:
    layers, widths = RESNET_LAYOUTS[name]
    if spatial_dims == 2:
        from timm.models.resnet import BasicBlock, ResNet

        # timm annotates `block` as an instance (Union[BasicBlock, Bottleneck]) but builds its stages
        # by calling it, as its own resnet18() does with the class: the annotation is wrong.
        net = ResNet(BasicBlock, layers, channels=widths, in_chans=in_channels, num_classes=0,  # pyright: ignore[reportArgumentType]
                     global_pool="")
        stem = [net.conv1, net.bn1, net.act1, net.maxpool]
    else:
        from monai.networks.nets.resnet import ResNet as MonaiResNet  # imported lazily: MONAI is slow to import

        # conv1_t_stride=2: the same stem reduction as the 2D ResNet (MONAI's default is 1), so that
        # `feature_stride` means the same in 2D and 3D.
        net = MonaiResNet(block="basic", layers=list(layers), block_inplanes=list(widths), spatial_dims=3,
                          n_input_channels=in_channels, conv1_t_stride=2, feed_forward=False)
        stem = [net.conv1, net.bn1, net.act, net.maxpool]
    stages = [net.layer1, net.layer2, net.layer3, net.layer4][:n_stages]
    return nn.Sequential(*stem, *stages), widths[n_stages - 1]


def create_backbone(name: str, in_channels: int, spatial_dims: int = 2, feature_stride: int = 32,
                    init: str = "random", tile: int | None = None) -> Backbone:
    """Build a feature extractor, randomly initialised unless ``init`` names pretrained weights.

    Args:
        name: ``resnet8|10|18|34`` (2D and 3D) or any timm model name (2D only).
        in_channels: input channels (1 for CT and X-ray, 3 for RGB); any number works.
        spatial_dims: 2 or 3.
        feature_stride: the largest total down-sampling allowed; the network is cut after the
            deepest stage that respects it.
        init: ``"random"``; for timm names also ``"imagenet"``, ``"file:PATH"`` or ``"hf-hub:ORG/REPO"``
            (see :func:`~.pretrained.resolve_init`). With one input channel timm sums the first
            convolution's RGB kernels.
        tile: encode the image as independent ``tile``-px tiles, one latent cell each
            (:class:`TiledBackbone`; 2D only); ``None``: the whole image at once.

    Raises:
        ValueError: for an unknown name or ``init``, a 3D request for a 2D-only timm model, or
            pretrained weights asked of the zoo's own ResNets.
        MissingExtraError: ``init="imagenet"`` for an EfficientNet-Lite without the ``pretrained`` extra.
        WeightsError: a weights file with a wrong checksum, format or tensor names.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if tile is not None and (spatial_dims != 2 or tile < 1):
        raise ValueError(f"tile must be a positive number of pixels of a 2D image, got tile={tile} with "
                         f"spatial_dims={spatial_dims}")
    if name in RESNET_LAYOUTS:
        if init != "random":
            raise ValueError(f"backbone {name!r} has no pretrained weights: use init='random', "
                             f"or a timm model name with init={init!r}")
        n_stages = _stages_for(feature_stride)
        body, channels = _resnet_body(name, in_channels, spatial_dims, n_stages)
        # Every strided layer (stem conv k7/p3, max-pool k3/p1, stage convs k3/p1 and 1x1/p0 shortcuts)
        # maps output index c to input index 2c, so cell i is centred on pixel stride * i.
        return _recorded(_built(body, BackboneInfo(channels, STAGE_REDUCTION[n_stages - 1], offset=0.0), tile),
                         name, in_channels, spatial_dims, feature_stride, tile)
    if spatial_dims == 3:
        raise ValueError(f"backbone {name!r} has no 3D version; use one of {sorted(RESNET_LAYOUTS)} for spatial_dims=3")
    import timm

    if name not in timm.list_models():
        raise ValueError(f"unknown backbone {name!r}: expected one of {sorted(RESNET_LAYOUTS)} or a timm model name")
    probe = timm.create_model(name, pretrained=False, in_chans=in_channels, features_only=True)
    reductions = _feature_info(probe).reduction()
    index = max((i for i, r in enumerate(reductions) if r <= feature_stride), default=None)
    if index is None:
        raise ValueError(f"{name}: no stage with reduction <= {feature_stride} (stages reduce by {reductions})")
    weights = resolve_init(init, name, in_channels)
    channels = _feature_info(probe).channels()[index]
    model = timm.create_model(name, pretrained=weights.pretrained, pretrained_cfg_overlay=weights.pretrained_cfg_overlay,
                              in_chans=in_channels)
    if hasattr(model, "prune_intermediate_layers") and hasattr(model, "forward_intermediates"):
        # drop the stages after the cut (and the head): they would run and hold parameters for nothing
        cast(Any, model).prune_intermediate_layers(indices=[index], prune_norm=True, prune_head=True)
        info = BackboneInfo(channels, reductions[index], provenance=weights.loaded_provenance())
        return _recorded(_built(model, info, tile, intermediate=index), name, in_channels, spatial_dims,
                         feature_stride, tile)
    body = timm.create_model(name, pretrained=weights.pretrained, pretrained_cfg_overlay=weights.pretrained_cfg_overlay,
                             in_chans=in_channels, features_only=True, out_indices=(index,))
    info = BackboneInfo(_feature_info(body).channels()[-1], reductions[index], provenance=weights.loaded_provenance())
    return _recorded(_built(body, info, tile, list_output=True), name, in_channels, spatial_dims, feature_stride, tile)


def _built(body: nn.Module, info: BackboneInfo, tile: int | None, list_output: bool = False,
           intermediate: int | None = None) -> Backbone:
    if tile is None:
        return Backbone(body, info, list_output=list_output, intermediate=intermediate)
    return TiledBackbone(body, info, tile, list_output=list_output, intermediate=intermediate)


def _recorded(backbone: Backbone, name: str, in_channels: int, spatial_dims: int, feature_stride: int,
              tile: int | None) -> Backbone:
    backbone.build_args = {"name": name, "in_channels": in_channels, "spatial_dims": spatial_dims,
                           "feature_stride": feature_stride, "tile": tile}
    return backbone


def _feature_info(model: nn.Module) -> FeatureInfo:
    """The ``feature_info`` of a timm model built with ``features_only=True``."""
    # timm.create_model is annotated to return a plain nn.Module (whose attributes type as
    # Tensor | Module); its features_only wrappers all carry a FeatureInfo here.
    return cast("FeatureInfo", model.feature_info)

"""Physical-unit heads: quantities in mm, mm², mL or HU computed at a known spacing.

A head predicts each quantity in the *pixel domain* — a length in pixels, an area in pixels², a
volume in voxels, or an intensity — and converts it with the image's spacing: a length is
multiplied by the spacing, an area by its square, a volume by the voxel volume, then pint converts
mm^k into the declared unit (mm, cm², mL, ...). The exponent k comes from the unit's
dimensionality, so nothing is hand-coded per quantity. Predicting pixel-domain sizes makes the
measurement follow the spacing the user gives, instead of assuming every image was acquired at the
training spacing.

Two heads share that contract:

- :class:`PhysicalHead` regresses each pixel-domain value from pooled features (any quantity,
  intensities included).
- :class:`LesionCountHead` measures sizes the way the ground truth is defined: it predicts, on a grid
  of small tiles, the fraction of each tile that is lesion (from the tile's own pixels and the
  backbone's context), counts lesion pixels (the sum of fractions times the tile's pixel count),
  and reads an area or volume as that count and a diameter as the equivalent circle's (2D) or
  sphere's (3D). The fraction map is the measurement's own
  explanation: it shows which pixels were counted, and every tile's share of the area is exact.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlmi_zoo.architectures.blocks.backbones import latent_to_input
from mlmi_zoo.specs import Measurement, QuantitySpec
from mlmi_zoo.units import convert, ureg

__all__ = ["PhysicalHead", "LesionCountHead", "canonical_scale", "dihedral_mean", "dihedral_views", "scaled_sample", "spacing_exponent", "spacing_ruler", "to_pixel_domain", "from_pixel_domain"]


@functools.lru_cache(maxsize=None)
def spacing_exponent(unit: str) -> int:
    """Power of length in ``unit``: 1 for mm (or DD), 2 for mm² (or DD²), 3 for mL, 0 for HU or dimensionless.

    A length is either in mm or in optic-disc diameters (DD, :mod:`mlmi_zoo.units`), never a mix; the
    spacing is then in that same ruler (mm per pixel, or DD per pixel for a fundus photograph).

    Raises:
        ValueError: for units that mix length with other dimensions (e.g. mm/s, or mm x DD).
    """
    dims = dict(ureg().Quantity(1, unit).dimensionality)
    length = dims.pop("[length]", 0)
    disc = dims.pop("[optic_disc]", 0)
    if (dims and set(dims) != {"[ct_number]"}) or (length and disc):
        raise ValueError(f"unit {unit!r} is neither a power of length (mm or DD) nor an intensity; a physical head "
                         f"cannot scale it")
    return int(length or disc)


def spacing_ruler(unit: str) -> str:
    """The unit a spacing must be given in for a quantity in ``unit``: ``"DD"`` for powers of the optic-disc
    diameter, else ``"mm"``."""
    return "DD" if "[optic_disc]" in dict(ureg().Quantity(1, unit).dimensionality) else "mm"


@functools.lru_cache(maxsize=None)
def _mm_power_to(unit: str) -> float:
    """The factor from (spacing ruler)^k to ``unit``: mm^k -> unit, or DD^k -> unit."""
    k = spacing_exponent(unit)
    return float(convert(1.0, f"{spacing_ruler(unit)}**{k}", unit)) if k else 1.0


def _spacing_factor(spacing: torch.Tensor, k: int) -> torch.Tensor:
    """(B, dims) spacing in mm -> (B,) mm^k per pixel-domain unit."""
    if k == 0:
        return torch.ones(spacing.shape[0], dtype=spacing.dtype, device=spacing.device)
    if k == spacing.shape[1]:
        return spacing.prod(-1)  # area of a pixel / volume of a voxel
    # Lengths (and in-plane areas of 3D images) use the geometric mean spacing per axis.
    return spacing.log().mean(-1).exp() ** k


def from_pixel_domain(values: torch.Tensor, spacing: torch.Tensor, spec: QuantitySpec) -> torch.Tensor:
    """(B,) pixel-domain values -> (B,) values in ``spec.unit`` at ``spacing`` (B, dims) mm."""
    k = spacing_exponent(spec.unit)
    return values * _spacing_factor(spacing, k) * _mm_power_to(spec.unit)


def to_pixel_domain(values: torch.Tensor, spacing: torch.Tensor, spec: QuantitySpec) -> torch.Tensor:
    """Inverse of :func:`from_pixel_domain`: (B,) values in ``spec.unit`` -> pixel domain."""
    k = spacing_exponent(spec.unit)
    return values / (_spacing_factor(spacing, k) * _mm_power_to(spec.unit))


class _UnitHead(nn.Module):
    """What every physical head shares: quantities, the standardisation buffers, units and loss.

    Subclasses produce ``(B, Q)`` standardised pixel-domain values; ``loc`` and ``scale`` (the
    training split's mean and std of the pixel-domain targets) travel with the weights.
    """

    loc: torch.Tensor  # (Q,) buffer
    scale: torch.Tensor  # (Q,) buffer

    def __init__(self, quantities: tuple[QuantitySpec, ...]) -> None:
        super().__init__()
        self.quantities = tuple(quantities)
        for q in self.quantities:
            spacing_exponent(q.unit)  # refuse unusable units at construction
        n = len(self.quantities)
        self.register_buffer("loc", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))

    def set_normalisation(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Store training-split mean and std of the pixel-domain targets."""
        self.loc.copy_(loc)
        self.scale.copy_(scale.clamp_min(1e-6))

    def pixel_spacing(self, spacing: torch.Tensor) -> torch.Tensor:
        """(B, dims) mm per pixel of the head's pixel domain for images at ``spacing``."""
        return spacing

    def measure(self, standardised: torch.Tensor, spacing: torch.Tensor) -> dict[str, Measurement]:
        """(B, Q) standardised predictions and (B, dims) spacing -> measurements in units."""
        pixel = standardised * self.scale + self.loc  # (B, Q)
        spacing = self.pixel_spacing(spacing)
        out = {}
        for j, q in enumerate(self.quantities):
            value = from_pixel_domain(pixel[:, j], spacing.to(pixel.dtype), q).clamp(q.low, q.high)
            out[q.name] = Measurement(q.name, value, q.unit)
        return out

    def targets(self, measurements: dict[str, torch.Tensor], spacing: torch.Tensor) -> torch.Tensor:
        """Ground-truth measurements (name -> (B,) in units) -> (B, Q) standardised pixel-domain targets."""
        spacing = self.pixel_spacing(spacing)
        cols = [to_pixel_domain(measurements[q.name].to(spacing.dtype), spacing, q) for q in self.quantities]
        return (torch.stack(cols, -1) - self.loc) / self.scale

    def loss(self, standardised: torch.Tensor, measurements: dict[str, torch.Tensor], spacing: torch.Tensor) -> torch.Tensor:
        """Smooth-L1 between predictions and targets in standardised pixel units (NaN targets ignored)."""
        target = self.targets(measurements, spacing)
        valid = torch.isfinite(target)
        if not valid.any():
            return standardised.sum() * 0.0
        return nn.functional.smooth_l1_loss(standardised[valid], target[valid])


class PhysicalHead(_UnitHead):
    """Predict physical quantities from pooled features.

    The network regresses each quantity's pixel-domain value, standardised with training-split
    statistics held in buffers (``loc``, ``scale``) so they travel with the weights.

    Args:
        in_features: width of the pooled feature vector.
        quantities: what to predict (name with unit, pint unit, valid range).
        hidden: width of the hidden layer.
    """

    def __init__(self, in_features: int, quantities: tuple[QuantitySpec, ...], hidden: int = 64) -> None:
        super().__init__(quantities)
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, len(self.quantities)))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, F) pooled features -> (B, Q) standardised pixel-domain predictions."""
        return self.mlp(pooled)


class LesionCountHead(_UnitHead):
    """Measure lesion sizes by counting lesion pixels on a predicted fraction map.

    The map has one value per tile of ``tile`` pixels per axis (tile ``j`` covers input pixels
    ``[tile*j, tile*(j+1))``): the fraction of the tile that is lesion. Two paths predict it:

    - a *local* path, ``log2(tile)`` stride-2 3x3 convolutions on the image itself, sees each tile's
      pixels, hence where the boundary runs inside it — detail a grid of ``stride`` pixels has
      pooled away;
    - the *context*, the backbone's features interpolated from the receptive-field centres of the
      latent cells to the tile centres, says whether the tile belongs to the lesion or to a vessel
      or the chest wall beside it.

    A two-layer 1x1 network on both gives each tile's logit. The lesion's pixel count is
    ``sum(fraction) * tile^dims``, and each quantity is read from it as its ground truth is defined
    for a mask:

    - an area (2D) or a volume (3D): the count itself;
    - a length: the equivalent diameter, ``2 sqrt(count / pi)`` (2D) or ``(6 count / pi)^(1/3)`` (3D).

    The spacing then converts pixels to units (:func:`from_pixel_domain`), so an object imaged at a
    finer spacing covers more pixels and gives the same size in mm. With ``canonical_spacing`` the
    head first resamples the image (and the context) onto that spacing, same size and centre, as
    :meth:`to_canonical` does: one object imaged at two spacings is then counted on one grid, so
    the two counts differ only by what resampling loses. With lesion masks, training fits the map
    to each tile's mask share (:meth:`map_loss`); the quantity loss calibrates the sum.

    Args:
        in_channels: backbone channels ``F``.
        quantities: sizes to measure (units of length, or of area in 2D / volume in 3D).
        spatial_dims: 2 or 3.
        stride: the backbone's total stride (pixels per latent cell per axis).
        tile: pixels per map tile per axis; a power of 2 that divides ``stride``.
        image_channels: channels of the network input.
        offset: input pixel of latent cell 0's receptive-field centre (``Backbone.offset``); None
            places cell ``i`` at ``stride * i + (stride - 1) / 2``.
        hidden: width of the local path and of the 1x1 network.
        canonical_spacing: mm per axis of the grid the head counts on, or None to count on the
            input's own pixels.
        context_backbone: the head's own backbone (same stride and ``offset`` as the model's),
            which computes the context from the image on the canonical grid; None when the context
            comes from the model's backbone (the caller passes its features).

    Raises:
        ValueError: for a quantity that is not a size of the lesion (an intensity, an area of a 3D
            lesion), or a tile that is not a power of 2 dividing the stride.
    """

    def __init__(self, in_channels: int, quantities: tuple[QuantitySpec, ...], spatial_dims: int, stride: int,
                 tile: int = 4, image_channels: int = 1, offset: float | None = 0.0, hidden: int = 32,
                 canonical_spacing: tuple[float, ...] | None = None,
                 context_backbone: nn.Module | None = None) -> None:
        super().__init__(quantities)
        for q in self.quantities:
            k = spacing_exponent(q.unit)
            if k not in (1, spatial_dims):
                what = "an area" if spatial_dims == 2 else "a volume"
                raise ValueError(f"a lesion-count head measures lengths or {what} of a {spatial_dims}D lesion; "
                                 f"{q.name!r} is in {q.unit!r}: regress it instead (no count head)")
        if tile < 1 or tile & (tile - 1) or stride % tile:
            raise ValueError(f"count_head.tile must be a power of 2 that divides the feature stride {stride}, got {tile}")
        self.spatial_dims, self.stride, self.tile = spatial_dims, stride, tile
        centre = (stride - 1) / 2 if offset is None else float(offset)
        # latent cell i lies at tile coordinate (centre + stride*i - (tile-1)/2) / tile
        self.context_offset = (centre - (tile - 1) / 2) / tile
        if canonical_spacing is not None and (len(canonical_spacing) != spatial_dims or min(canonical_spacing) <= 0):
            raise ValueError(f"canonical_spacing must be {spatial_dims} positive mm values, got {canonical_spacing}")
        self.canonical_spacing = None if canonical_spacing is None else tuple(float(v) for v in canonical_spacing)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        local: list[nn.Module] = []
        width = image_channels
        for _ in range(int(math.log2(tile))):
            local += [conv(width, hidden, 3, stride=2, padding=1), nn.ReLU()]
            width = hidden
        local += [conv(width, hidden, 3, padding=1), nn.ReLU()]  # boundary evidence from neighbouring tiles
        self.local = nn.Sequential(*local)
        self.fraction = nn.Sequential(conv(width + in_channels, hidden, 1), nn.ReLU(), conv(hidden, 1, 1))
        self.context_backbone = context_backbone

    # -- the canonical grid ---------------------------------------------------------------------
    def _scale(self, spacing: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """(B, dims) canonical / given spacing in ``affine_grid`` axis order, or None (no resampling)."""
        if self.canonical_spacing is None or spacing is None:
            return None
        return canonical_scale(self.canonical_spacing, spacing, like)

    def pixel_spacing(self, spacing: torch.Tensor) -> torch.Tensor:
        """The canonical spacing when the head resamples, else ``spacing``."""
        if self.canonical_spacing is None:
            return spacing
        return torch.tensor(self.canonical_spacing, dtype=spacing.dtype, device=spacing.device).expand(spacing.shape[0], -1)

    def to_canonical(self, x: torch.Tensor, spacing: torch.Tensor | None) -> torch.Tensor:
        """(B, K, *S) images or maps at ``spacing`` -> the same field of view around the centre,
        sampled at the canonical spacing (bilinear; 0 outside the image). The identity without a
        canonical spacing or a spacing."""
        scale = self._scale(spacing, x)
        return x if scale is None else scaled_sample(x, scale)

    def from_canonical(self, maps: torch.Tensor, spacing: torch.Tensor | None) -> torch.Tensor:
        """Inverse of :meth:`to_canonical` for maps (B, K, *S) on the canonical grid."""
        scale = self._scale(spacing, maps)
        return maps if scale is None else scaled_sample(maps, 1.0 / scale)

    # -- the map and the count ------------------------------------------------------------------
    def fraction_map(self, x: torch.Tensor, feats: torch.Tensor, spacing: torch.Tensor | None = None,
                     canonical_feats: bool = False) -> torch.Tensor:
        """Network input (B, C, *spatial) and backbone features (B, F, *latent) -> (B, 1, *tiles)
        lesion fraction of each tile, in [0, 1]; ``tiles = ceil(spatial / tile)``. With a canonical
        spacing and ``spacing`` (B, dims) the tiles lie on the canonical grid.

        ``canonical_feats``: ``feats`` were computed from ``to_canonical(x, spacing)``, so they lie
        on the canonical grid already and are not resampled (the default takes features of ``x``
        as given and resamples their interpolated context)."""
        context = latent_to_input(feats, self.tiles(x.shape[2:]), self.stride // self.tile, self.context_offset)  # (B, F, *tiles)
        local = self.local(self.to_canonical(x, spacing))  # (B, H, *tiles)
        context = context if canonical_feats else self.to_canonical(context, spacing)
        return torch.sigmoid(self.fraction(torch.cat([local, context], 1)))

    def tiles(self, size: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        """Tiles per axis of the map of an input of ``size`` pixels: ``ceil(size / tile)``."""
        return tuple(-(-int(n) // self.tile) for n in size)

    def count(self, fractions: torch.Tensor) -> torch.Tensor:
        """(B, 1, *tiles) fraction map -> (B,) lesion pixel count."""
        return fractions.flatten(1).sum(1) * float(self.tile ** self.spatial_dims)

    def pixel_values(self, count: torch.Tensor) -> torch.Tensor:
        """(B,) pixel count -> (B, Q) pixel-domain sizes (count, or equivalent diameter in pixels)."""
        cols = []
        for q in self.quantities:
            if spacing_exponent(q.unit) == 1:
                # sqrt / cube root have an infinite slope at 0: a floor of a hundredth of a pixel keeps it finite
                c = count.clamp_min(1e-2)
                cols.append(2.0 * (c / math.pi).sqrt() if self.spatial_dims == 2 else (6.0 * c / math.pi) ** (1.0 / 3.0))
            else:
                cols.append(count)
        return torch.stack(cols, -1)

    def forward(self, x: torch.Tensor, feats: torch.Tensor, spacing: torch.Tensor | None = None,
                canonical_feats: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Input (B, C, *spatial), features (B, F, *latent) and (B, dims) spacing -> ((B, Q)
        standardised pixel-domain sizes, (B, 1, *tiles) fraction map); ``canonical_feats`` as in
        :meth:`fraction_map`."""
        fractions = self.fraction_map(x, feats, spacing, canonical_feats)
        return self.standardised(fractions), fractions

    def standardised(self, fractions: torch.Tensor) -> torch.Tensor:
        """(B, 1, *tiles) fraction map -> (B, Q) standardised pixel-domain sizes (what ``forward`` returns)."""
        return (self.pixel_values(self.count(fractions)) - self.loc) / self.scale

    def mask_fractions(self, mask: torch.Tensor, tiles: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """(B, 1, *spatial) lesion mask -> (B, 1, *tiles) share of each tile on the mask (pixels past
        the image count as off the mask)."""
        mask = mask.float()
        pad: list[int] = []
        for n_in, n_tiles in zip(reversed(mask.shape[2:]), reversed(tuple(tiles))):
            pad += [0, max(0, n_tiles * self.tile - n_in)]
        pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
        out = pool(F.pad(mask, pad), kernel_size=self.tile, stride=self.tile)
        return out[(slice(None), slice(None), *(slice(0, n) for n in tiles))]

    def map_loss(self, fractions: torch.Tensor, mask: torch.Tensor, spacing: torch.Tensor | None = None) -> torch.Tensor:
        """Binary cross-entropy between the predicted fractions (B, 1, *tiles) and the mask's share
        of each tile (B, 1, *spatial mask at ``spacing``, resampled like the image), averaged over tiles."""
        target = self.mask_fractions(self.to_canonical(mask.float(), spacing), fractions.shape[2:])
        return F.binary_cross_entropy(fractions.clamp(1e-6, 1 - 1e-6), target)

    def to_input(self, fractions: torch.Tensor, size: tuple[int, ...] | torch.Size,
                 spacing: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, *tiles) -> (B, 1, *size): each tile's fraction on its own pixels (nearest), taken
        back from the canonical grid to the image's pixels when the head resamples (there the
        values are per canonical pixel)."""
        out = fractions
        for axis in range(self.spatial_dims):
            out = out.repeat_interleave(self.tile, dim=2 + axis)
        return self.from_canonical(out[(slice(None), slice(None), *(slice(0, int(n)) for n in size))], spacing)


def canonical_scale(canonical: Any, given: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """(B, dims) ``canonical / given`` spacing, last axis first (the order of ``affine_grid``), for
    :func:`scaled_sample` onto the canonical grid; None when ``given`` is already canonical.

    Args:
        canonical: (dims,) mm per pixel of the canonical grid.
        given: (dims,) or (B, dims) mm per pixel of the images.
        like: a (B, ...) tensor whose batch size, dtype and device the scale takes.
    """
    target = torch.as_tensor(canonical, dtype=like.dtype, device=like.device)
    scale = (target / given.to(like.device, like.dtype)).expand(like.shape[0], -1).flip(-1)
    return None if bool((scale == 1).all()) else scale


def scaled_sample(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Sample ``x`` (B, C, *S) on a grid of the same size and centre whose pixels are ``scale``
    (B, dims, last axis first) of x's pixels; outside x's field of view gives 0."""
    b, dims = x.shape[0], x.ndim - 2
    theta = torch.zeros(b, dims, dims + 1, dtype=x.dtype, device=x.device)
    theta[:, torch.arange(dims), torch.arange(dims)] = scale
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


_Views = Iterator[tuple[torch.Tensor, "torch.Tensor | None", Callable[[torch.Tensor], torch.Tensor]]]


def dihedral_views(x: torch.Tensor, spacing: torch.Tensor | None) -> _Views:
    """The 8 flips and quarter turns of the image plane (the last two axes) of ``x`` (B, C, *S).

    Yields ``(view, view_spacing, back)``, the identity first: ``back`` turns a tensor laid out
    like the view (any leading axes, the same plane) back onto ``x``'s layout, and a quarter turn
    swaps the plane's two spacings in ``view_spacing`` ((B, dims) or None). Averaging a network's
    maps over the views, each turned back, makes them exactly equivariant (and their means
    invariant) to the group a model was trained to be indifferent to (``data.augment: dihedral``).
    """
    plane = (-2, -1)
    for turns in range(4):
        view_spacing = spacing
        if spacing is not None and turns % 2:
            view_spacing = spacing[:, [*range(spacing.shape[1] - 2), -1, -2]]
        for flip in (False, True):
            view = torch.rot90(x, turns, plane)

            def back(t: torch.Tensor, turns: int = turns, flip: bool = flip) -> torch.Tensor:
                return torch.rot90(t.flip(-1) if flip else t, -turns, plane)

            yield (view.flip(-1) if flip else view), view_spacing, back


def dihedral_mean(fn: Callable[[torch.Tensor, "torch.Tensor | None"], tuple["torch.Tensor | None", ...]],
                  x: torch.Tensor, spacing: torch.Tensor | None, planar: tuple[bool, ...],
                  identity: tuple["torch.Tensor | None", ...] | None = None) -> tuple["torch.Tensor | None", ...]:
    """Mean over the 8 :func:`dihedral_views` of ``fn(view, view_spacing)``, a tuple of tensors or
    Nones; the outputs flagged in ``planar`` lie on the image plane and are turned back onto
    ``x``'s layout first (the others, e.g. pooled vectors, are averaged as they are).
    ``identity``: ``fn``'s outputs for ``x`` itself when the caller has them already."""
    total: list[torch.Tensor | None] = [None] * len(planar)
    for i, (view, view_spacing, back) in enumerate(dihedral_views(x, spacing)):
        outputs = identity if i == 0 and identity is not None else fn(view, view_spacing)
        for j, (out, turn) in enumerate(zip(outputs, planar)):
            if out is not None:
                out = back(out) if turn else out
                running = total[j]
                total[j] = out if running is None else running + out
    return tuple(None if t is None else t / 8 for t in total)

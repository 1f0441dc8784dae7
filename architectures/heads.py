"""Physical-unit heads: quantities in mm, mm², mL or HU computed at a known spacing.

A head predicts each quantity in the *pixel domain* — a length in pixels, an area in pixels², a
volume in voxels, or an intensity — and converts it with the image's spacing: a length is
multiplied by the spacing, an area by its square, a volume by the voxel volume, then pint converts
mm^k into the declared unit (mm, cm², mL, ...). The exponent k comes from the unit's
dimensionality, so nothing is hand-coded per quantity. Predicting pixel-domain sizes makes the
measurement follow the spacing the user gives, instead of assuming every image was acquired at the
training spacing.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from mlmi_zoo.specs import Measurement, QuantitySpec
from mlmi_zoo.units import convert, ureg

__all__ = ["PhysicalHead", "spacing_exponent", "to_pixel_domain", "from_pixel_domain"]


@functools.lru_cache(maxsize=None)
def spacing_exponent(unit: str) -> int:
    """Power of length in ``unit``: 1 for mm, 2 for mm², 3 for mL, 0 for HU or dimensionless.

    Raises:
        ValueError: for units that mix length with other dimensions (e.g. mm/s).
    """
    dims = dict(ureg().Quantity(1, unit).dimensionality)
    length = dims.pop("[length]", 0)
    if dims and set(dims) != {"[ct_number]"}:
        raise ValueError(f"unit {unit!r} is neither a power of length nor an intensity; a physical head cannot scale it")
    return int(length)


@functools.lru_cache(maxsize=None)
def _mm_power_to(unit: str) -> float:
    k = spacing_exponent(unit)
    return float(convert(1.0, f"mm**{k}", unit)) if k else 1.0


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


class PhysicalHead(nn.Module):
    """Predict physical quantities from pooled features.

    The network regresses each quantity's pixel-domain value, standardised with training-split
    statistics held in buffers (``loc``, ``scale``) so they travel with the weights.

    Args:
        in_features: width of the pooled feature vector.
        quantities: what to predict (name with unit, pint unit, valid range).
        hidden: width of the hidden layer.
    """

    def __init__(self, in_features: int, quantities: tuple[QuantitySpec, ...], hidden: int = 64) -> None:
        super().__init__()
        self.quantities = tuple(quantities)
        for q in self.quantities:
            spacing_exponent(q.unit)  # refuse unusable units at construction
        n = len(self.quantities)
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n))
        self.register_buffer("loc", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))

    def set_normalisation(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Store training-split mean and std of the pixel-domain targets."""
        self.loc.copy_(loc)
        self.scale.copy_(scale.clamp_min(1e-6))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, F) pooled features -> (B, Q) standardised pixel-domain predictions."""
        return self.mlp(pooled)

    def measure(self, standardised: torch.Tensor, spacing: torch.Tensor) -> dict[str, Measurement]:
        """(B, Q) standardised predictions and (B, dims) spacing -> measurements in units."""
        pixel = standardised * self.scale + self.loc  # (B, Q)
        out = {}
        for j, q in enumerate(self.quantities):
            value = from_pixel_domain(pixel[:, j], spacing.to(pixel.dtype), q).clamp(q.low, q.high)
            out[q.name] = Measurement(q.name, value, q.unit)
        return out

    def targets(self, measurements: dict[str, torch.Tensor], spacing: torch.Tensor) -> torch.Tensor:
        """Ground-truth measurements (name -> (B,) in units) -> (B, Q) standardised pixel-domain targets."""
        cols = [to_pixel_domain(measurements[q.name].to(spacing.dtype), spacing, q) for q in self.quantities]
        return (torch.stack(cols, -1) - self.loc) / self.scale

    def loss(self, standardised: torch.Tensor, measurements: dict[str, torch.Tensor], spacing: torch.Tensor) -> torch.Tensor:
        """Smooth-L1 between predictions and targets in standardised pixel units (NaN targets ignored)."""
        target = self.targets(measurements, spacing)
        valid = torch.isfinite(target)
        if not valid.any():
            return standardised.sum() * 0.0
        return nn.functional.smooth_l1_loss(standardised[valid], target[valid])

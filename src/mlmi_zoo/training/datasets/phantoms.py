"""Digital lung-nodule phantoms: CT-like patches in Hounsfield units with exact ground truth.

A procedural stand-in for low-dose chest CT nodule patches (the setting of LIDC-IDRI, Armato et al.,
Medical Physics 2011), built so that every element of interpretability can be *measured*: the lesion
mask is exact, the concepts (spiculation, calcification, texture, margin) are the parameters that drew
the nodule and its Lung-RADS-like size category is read from the measured diameter, the physical
measurements (diameter in mm, area in mm^2 / volume in mL, mean HU) are computed from the mask at the
true spacing, and the label follows a documented Lung-RADS-like rule
(American College of Radiology, Lung-RADS v1.1, 2019; simplified — see ``PHANTOMS.md``).

What we changed with respect to a real CT: the anatomy is a patch of parenchyma (-850 HU with a smooth
low-frequency variation), a few in-plane vessels, an optional chest wall and correlated noise; the
nodule is a star-shaped body ``r(u) = R (1 + lobulation(u)) + spikes(u)`` defined in millimetres, so the
same object can be rendered at any spacing (:meth:`NodulePhantom.render`). ``source="lidc"`` replaces
the drawn nodule by a real radiologist contour from LIDC-IDRI (see :mod:`.lidc`).

Case ``i`` depends only on ``(seed, i)``: all its random numbers come from
``numpy.random.default_rng([seed, i])``, so it is bit-identical at any data-set length and in any
DataLoader worker.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mlmi_zoo.specs import ConceptSpec, QuantitySpec
from mlmi_zoo.units import convert

__all__ = [
    "NodulePhantom",
    "NodulePhantomConfig",
    "NoduleShape",
    "BackgroundParams",
    "draw_background",
    "render_background",
    "correlated_noise",
    "nodule_malignancy_rule",
    "nodule_size_category",
    "equivalent_diameter_mm",
    "LUNG_WINDOW_HU",
]

LUNG_WINDOW_HU = (-1350.0, 150.0)  # level -600, width 1500: the usual lung window
AIR_HU = -1024.0  # CT numbers are clipped here, as scanners do

# Lung-RADS-like thresholds of the label rule (see nodule_malignancy_rule and PHANTOMS.md).
LARGE_NODULE_MM = 15.0
PART_SOLID_NODULE_MM = 8.0

TEXTURE_LEVELS = ("solid", "part-solid", "ground-glass")
# Lung-RADS-like size categories, cut at the label rule's own thresholds (see nodule_size_category).
SIZE_CATEGORY_LEVELS = ("<8 mm", "8-15 mm", ">=15 mm")

_CENTRE_OFFSET_MM = 1.0  # max |offset| of the nodule centre from the patch centre, per axis
_BORDER_MM = 1.0  # free margin between the furthest nodule point and the patch edge
_SPIKE_MM = (1.0, 3.5)  # spicule length range (absolute, so large nodules still fit)
_LOBULATION_MAX = 0.10  # sum of |lobulation amplitudes| (relative radius)
_N_LOB = 3  # lobulation terms
_MAX_SPIKES = 12


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodulePhantomConfig:
    """Everything that defines a :class:`NodulePhantom`; case ``i`` is a function of this and ``i``.

    Args:
        length: number of cases; ``None`` in ``source="lidc"`` mode means all readings of the split.
        spatial_dims: 2 (a patch ``(H, W)``) or 3 (a volume ``(D, H, W)``).
        size: patch size in pixels; an int means the same on every axis.
        spacing_range: in-plane pixel spacing (mm) drawn uniformly per case (synthetic source).
        slice_spacing_range: slice spacing (mm) drawn uniformly per case (3D synthetic source).
        diameter_range_mm: base diameter of the nodule body, drawn uniformly; the upper end is
            lowered so the nodule always fits the smallest field of view (see ``max_diameter_mm``).
        seed: data-set seed.
        source: ``"synthetic"`` or ``"lidc"`` (real LIDC-IDRI contours and ratings).
        p_nodule: probability that a case holds a nodule (synthetic only).
        label_noise: probability that the rule's label is flipped.
        lidc_path: path of the LIDC-IDRI annotation SQLite (``source="lidc"``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` (all patients), LIDC only.
        p_spiculation: prior of spiculated nodules.
        p_calcification: prior of calcified nodules.
        texture_probs: priors of solid / part-solid / ground-glass.
        p_sharp: prior of a sharp margin.
        p_chest_wall: probability of a chest-wall region in the patch.
    """

    length: int | None = None
    spatial_dims: int = 2
    size: int | tuple[int, ...] = 64
    spacing_range: tuple[float, float] = (0.5, 1.0)
    slice_spacing_range: tuple[float, float] = (1.0, 2.5)
    diameter_range_mm: tuple[float, float] = (4.0, 30.0)
    seed: int = 0
    source: str = "synthetic"
    p_nodule: float = 1.0
    label_noise: float = 0.0
    lidc_path: str | None = None
    split: str | None = None
    p_spiculation: float = 0.3
    p_calcification: float = 0.15
    texture_probs: tuple[float, float, float] = (0.6, 0.2, 0.2)
    p_sharp: float = 0.5
    p_chest_wall: float = 0.3

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.source not in ("synthetic", "lidc"):
            raise ValueError(f"source must be 'synthetic' or 'lidc', got {self.source!r}")
        if self.source == "synthetic" and (self.length is None or self.length < 0):
            raise ValueError(f"a synthetic NodulePhantom needs a length >= 0, got {self.length!r}")
        if not 0.0 <= self.label_noise <= 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5], got {self.label_noise}")
        if not 0.0 <= self.p_nodule <= 1.0:
            raise ValueError(f"p_nodule must be in [0, 1], got {self.p_nodule}")
        lo, hi = self.spacing_range
        if not 0 < lo <= hi:
            raise ValueError(f"spacing_range must be (low, high) with 0 < low <= high mm, got {self.spacing_range}")
        if abs(sum(self.texture_probs) - 1.0) > 1e-6:
            raise ValueError(f"texture_probs must sum to 1, got {self.texture_probs}")
        shape = self.shape
        if len(shape) != self.spatial_dims or min(shape) < 8:
            raise ValueError(f"size must be an int or {self.spatial_dims} ints >= 8, got {self.size!r}")
        if self.source == "synthetic" and self.max_diameter_mm <= self.diameter_range_mm[0]:
            raise ValueError(
                f"a {shape} patch at {self.spacing_range[0]} mm spacing cannot hold a nodule of "
                f">= {self.diameter_range_mm[0]} mm; use a larger size or spacing"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape ``(H, W)`` or ``(D, H, W)`` in pixels."""
        if isinstance(self.size, int):
            return (self.size,) * self.spatial_dims
        return tuple(int(s) for s in self.size)

    @property
    def max_diameter_mm(self) -> float:
        """Largest base diameter drawn: ``min(diameter_range_mm[1], what fits the smallest FOV)``.

        The furthest nodule point is at most ``R (1 + 0.10) + spike_max_mm`` from its centre, the centre is
        at most 1 mm off the patch centre per axis, and 1 mm of border is kept.
        """
        half = 0.5 * self.min_fov_mm - _BORDER_MM - _CENTRE_OFFSET_MM * math.sqrt(self.spatial_dims) - self.spike_max_mm
        return min(self.diameter_range_mm[1], 2.0 * half / (1.0 + _LOBULATION_MAX))

    @property
    def min_fov_mm(self) -> float:
        """Smallest field of view over axes at the smallest spacings (mm)."""
        return min(n * s for n, s in zip(self.shape, self._min_spacing()))

    @property
    def spike_max_mm(self) -> float:
        """Longest spicule: 3.5 mm, or a tenth of the smallest field of view if that is less."""
        return min(_SPIKE_MM[1], 0.1 * self.min_fov_mm)

    def _min_spacing(self) -> tuple[float, ...]:
        if self.spatial_dims == 2:
            return (self.spacing_range[0],) * 2
        return (self.slice_spacing_range[0], self.spacing_range[0], self.spacing_range[0])


# ---------------------------------------------------------------------------------------------
# geometry and rendering helpers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoduleShape:
    """A nodule in millimetres: the star-shaped body ``r(u)`` and its density pattern.

    ``r(u) = R (1 + sum_j a_j cos(pi m_j <u, v_j> + phi_j)) + sum_k L_k exp(-p (1 - <u, s_k>))`` for
    a unit direction ``u`` from the centre; a point at distance ``rho`` is inside iff ``rho <= r(u)``.
    """

    centre_mm: np.ndarray  # (dims,) offset from the patch centre, array-axis order
    radius_mm: float  # R: base radius (half the drawn base diameter)
    lob_amp: np.ndarray  # (J,) relative lobulation amplitudes
    lob_dir: np.ndarray  # (J, dims) unit vectors
    lob_freq: np.ndarray  # (J,)
    lob_phase: np.ndarray  # (J,)
    spike_len_mm: np.ndarray  # (K,) spicule lengths, K = 0 when not spiculated
    spike_dir: np.ndarray  # (K, dims) unit vectors
    spike_power: float  # p: larger = thinner spicules
    texture: int  # 0 solid, 1 part-solid, 2 ground-glass
    calcified: bool
    sharp: bool
    hu_solid: float
    hu_ggo: float
    hu_calc: float
    core_frac: float  # part-solid: solid core where rho / r(u) < core_frac
    calc_frac: float  # calcified core where rho / r(u) < calc_frac
    edge_mm: float  # blurred margin: width of the tanh edge (mm); sharp margins use one pixel

    def radius_of(self, u: np.ndarray) -> np.ndarray:
        """Boundary distance ``r(u)`` in mm for unit directions ``u`` of shape ``(n, dims)``."""
        proj = u @ self.lob_dir.T  # (n, J)
        r = self.radius_mm * (1.0 + np.cos(np.pi * self.lob_freq * proj + self.lob_phase) @ self.lob_amp)
        if len(self.spike_len_mm):
            s = np.exp(self.spike_power * (u @ self.spike_dir.T - 1.0))  # (n, K)
            r = r + s @ self.spike_len_mm
        return r


@dataclass(frozen=True)
class BackgroundParams:
    """Lung parenchyma, vessels, chest wall and noise of one patch (all geometry in mm)."""

    base_hu: float
    wave_k: np.ndarray  # (3, dims) wave vectors in rad/mm
    wave_phase: np.ndarray  # (3,)
    wave_amp: np.ndarray  # (3,) HU
    vessel_point: np.ndarray  # (V, dims) a point on each vessel axis (mm)
    vessel_dir: np.ndarray  # (V, dims) unit axis directions
    vessel_perp: np.ndarray  # (V, dims) unit direction of the wiggle
    vessel_radius: np.ndarray  # (V,) mm
    vessel_hu: np.ndarray  # (V,)
    vessel_bend: np.ndarray  # (V,) curvature: the axis is p + t d + bend t^2 q  (1/mm)
    wall: tuple[np.ndarray, float, float] | None  # (unit normal, distance mm, curvature 1/mm)
    noise_hu: float  # std of the correlated noise
    noise_smoothing: float  # side weight a of the [a, 1, a] noise filter (see correlated_noise)


def _clip01(a: np.ndarray) -> np.ndarray:
    """``np.clip(a, 0, 1)`` in place for a fresh temporary: the same values, without np.clip's call overhead."""
    np.maximum(a, 0.0, out=a)
    return np.minimum(a, 1.0, out=a)


def _unit(v: np.ndarray) -> np.ndarray:
    """Rows of ``v`` scaled to unit length."""
    return v / np.maximum(np.sqrt((v * v).sum(1, keepdims=True)), 1e-12)


_MAX_VESSELS = 5


def draw_background(rng: np.random.Generator, dims: int, fov_mm: float, keep_out_mm: float,
                    p_chest_wall: float) -> BackgroundParams:
    """Draw a background: parenchyma level and waves, 1-5 vessels, maybe a chest wall, noise level.

    The generator is consumed by a fixed number of draws whatever the outcome, so later draws of the
    case do not depend on, e.g., the number of vessels.

    Args:
        rng: the case's generator.
        dims: 2 or 3.
        fov_mm: smallest field of view of the patch (mm); vessels are placed inside it.
        keep_out_mm: the chest wall stays at least ``keep_out_mm + 2`` mm from the patch centre.
        p_chest_wall: probability of a chest wall.

    Returns:
        The background parameters.
    """
    u = rng.random(10 + 5 * _MAX_VESSELS)
    normals = rng.standard_normal((4 + 2 * _MAX_VESSELS, dims))
    points = rng.random((_MAX_VESSELS, dims))
    n_vessels = 1 + int(u[0] * _MAX_VESSELS)  # 1..5
    v = slice(10, 10 + _MAX_VESSELS)
    wave_k = _unit(normals[:3]) * (2 * np.pi / (15.0 + 45.0 * u[1:4, None]))
    direction = _unit(normals[4:4 + _MAX_VESSELS])[:n_vessels]
    perp = normals[4 + _MAX_VESSELS:][:n_vessels]
    perp = _unit(perp - (perp * direction).sum(1, keepdims=True) * direction)
    wall = None
    if u[7] < p_chest_wall:
        wall = (_unit(normals[3:4])[0], keep_out_mm + 2.0 + 6.0 * u[8], 0.02 * u[9])
    return BackgroundParams(
        base_hu=-850.0 + 60.0 * (u[4] - 0.5),
        wave_k=wave_k,
        wave_phase=2 * np.pi * u[10 + 3 * _MAX_VESSELS:13 + 3 * _MAX_VESSELS],
        wave_amp=5.0 + 10.0 * u[13 + 3 * _MAX_VESSELS:16 + 3 * _MAX_VESSELS],
        vessel_point=((points - 0.5) * fov_mm)[:n_vessels],
        vessel_dir=direction,
        vessel_perp=perp,
        vessel_radius=(0.4 + 1.2 * u[v] ** 2)[:n_vessels],
        vessel_hu=(-250.0 + 300.0 * u[10 + _MAX_VESSELS:10 + 2 * _MAX_VESSELS])[:n_vessels],
        vessel_bend=(0.016 * (u[10 + 2 * _MAX_VESSELS:10 + 3 * _MAX_VESSELS] - 0.5))[:n_vessels],
        wall=wall,
        noise_hu=20.0 + 20.0 * u[5],
        noise_smoothing=0.3 + 0.4 * u[6],
    )


@functools.lru_cache(maxsize=32)
def _centred_axes(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Per-axis pixel indices relative to the patch centre (1D float32 arrays)."""
    return tuple(np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2.0) for n in shape)


@functools.lru_cache(maxsize=32)
def _centred_grid(shape: tuple[int, ...]) -> np.ndarray:
    """Pixel-centre indices relative to the patch centre, flattened: ``(dims, N)`` float32."""
    grids = np.meshgrid(*_centred_axes(shape), indexing="ij")
    return np.ascontiguousarray(np.stack([g.ravel() for g in grids], 0))


def _positions(shape: tuple[int, ...], spacing: Sequence[float], centre: np.ndarray) -> np.ndarray:
    """mm coordinates of all pixel centres relative to ``centre``: ``(dims, N)`` float32."""
    sp = np.asarray(spacing, dtype=np.float32)[:, None]
    return _centred_grid(shape) * sp - np.asarray(centre, dtype=np.float32)[:, None]


def correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], smoothing: float) -> np.ndarray:
    """Zero-mean, unit-variance correlated noise: white noise filtered by ``[a, 1, a]`` on every axis.

    Uniform white noise is used (it is faster to draw than Gaussian); after the separable filter
    each value is a weighted sum of ``3**dims`` draws, close to Gaussian.

    Args:
        rng: generator.
        shape: array shape.
        smoothing: the side weight ``a`` in ``[0, 1]``; 0 gives white noise, 1 a box filter.

    Returns:
        float32 array of ``shape``.
    """
    a = np.float32(smoothing)
    out = rng.random(tuple(n + 2 for n in shape), dtype=np.float32)
    out -= np.float32(0.5)
    for axis in range(len(shape)):
        n = out.shape[axis]
        lo = [slice(None)] * len(shape)
        mid = list(lo)
        hi = list(lo)
        lo[axis], mid[axis], hi[axis] = slice(0, n - 2), slice(1, n - 1), slice(2, n)
        out = out[tuple(mid)] + a * (out[tuple(lo)] + out[tuple(hi)])
    # var(U(-1/2, 1/2)) = 1/12; each axis multiplies the variance by 1 + 2 a^2.
    out *= np.float32(math.sqrt(12.0 / (1.0 + 2.0 * float(a) ** 2) ** len(shape)))
    return out


def render_background(bg: BackgroundParams, shape: tuple[int, ...], spacing: Sequence[float],
                      centre: np.ndarray | None = None) -> np.ndarray:
    """Noise-free background in HU: parenchyma + waves, vessels, chest wall.

    Args:
        bg: parameters from :func:`draw_background`.
        shape: spatial shape.
        spacing: mm per axis.
        centre: mm offset of the coordinate origin from the patch centre (default 0).

    Returns:
        float32 array of ``shape``.
    """
    dims = len(shape)
    centre = np.zeros(dims) if centre is None else np.asarray(centre)
    # Low-frequency waves: cos(<k, x> + phi) is separable as a product of 1D complex exponentials.
    axes = [(ax * np.float32(s) - np.float32(c)).astype(np.float64) for ax, s, c in zip(_centred_axes(shape), spacing, centre)]
    if dims == 2:  # cos(a + b + phi) = cos(a + phi) cos(b) - sin(a + phi) sin(b): two small matmuls
        ay = np.outer(axes[0], bg.wave_k[:, 0]) + bg.wave_phase  # (H, W_waves)
        bx = np.outer(axes[1], bg.wave_k[:, 1])  # (W, W_waves)
        waves = (np.cos(ay) * bg.wave_amp) @ np.cos(bx).T - (np.sin(ay) * bg.wave_amp) @ np.sin(bx).T
    else:
        factors = [np.exp(1j * np.outer(x, bg.wave_k[:, a])) for a, x in enumerate(axes)]  # (n_a, W_waves)
        factors[0] = factors[0] * (bg.wave_amp * np.exp(1j * bg.wave_phase))
        waves = np.einsum("aw,bw,cw->abc", *factors).real
    img = (waves.astype(np.float32) + np.float32(bg.base_hu)).ravel()  # (N,)
    pos = _positions(shape, spacing, centre)  # (dims, N)
    pos2 = (pos * pos).sum(0) if dims == 3 or bg.wall is not None else None  # (N,)
    d, q = bg.vessel_dir.astype(np.float32), bg.vessel_perp.astype(np.float32)  # (V, dims)
    p0 = bg.vessel_point.astype(np.float32)  # (V, dims)
    col = (lambda a: a.astype(np.float32)[:, None])  # noqa: E731  (V,) -> (V, 1)
    along = d @ pos - col((p0 * d).sum(1))  # (V, N)
    across = q @ pos - col((p0 * q).sum(1))  # (V, N): component along the bending direction
    bend = col(bg.vessel_bend) * along * along  # (V, N)
    if dims == 2:  # x - p0 = along d + across q exactly
        off = across - bend
        dist2 = off * off
    else:
        rel2 = pos2 - 2.0 * (p0 @ pos) + col((p0 * p0).sum(1))  # (V, N) |x - p0|^2
        dist2 = np.maximum(rel2 - along * along - 2.0 * bend * across + bend * bend, 0.0)
    r = col(bg.vessel_radius)
    # a 0.4 mm linear edge, written in squared distances: r^2 - d^2 ~ 2 r (r - d) near the wall
    alpha = _clip01(np.float32(0.5) + (r * r - dist2) / (np.float32(0.8) * r))
    img = img + (alpha * (col(bg.vessel_hu) - img)).max(0)
    if bg.wall is not None:
        normal, dist, curv = bg.wall
        along_w = normal.astype(np.float32) @ pos
        depth = along_w + np.float32(curv) * (pos2 - along_w * along_w) - np.float32(dist)
        alpha_w = _clip01(np.float32(0.5) + depth)  # 1 mm edge
        img = img + alpha_w * (np.float32(40.0) - img)
    return img.reshape(shape)


_TABLE_2D = 512


def _pseudo_angle(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A cheap monotonic stand-in for the polar angle: the diamond angle in ``[0, 4)``."""
    t = y / (np.abs(x) + np.abs(y) + np.float32(1e-12))
    return np.where(x >= 0, t, np.float32(2.0) - t) + np.float32(1.0)


@functools.lru_cache(maxsize=4)
def _table_directions_2d(n: int) -> np.ndarray:
    """Unit directions ``(n, 2)`` in (y, x) order at uniformly spaced diamond angles."""
    p = np.arange(n) * (4.0 / n) - 1.0  # diamond angle - 1, in [-1, 3)
    t = np.where(p <= 1.0, p, 2.0 - p)
    x = np.where(p <= 1.0, 1.0 - np.abs(t), np.abs(t) - 1.0)
    return _unit(np.stack([t, x], 1))


def _direction_table_2d(shape: NoduleShape, n: int = _TABLE_2D) -> np.ndarray:
    return shape.radius_of(_table_directions_2d(n)).astype(np.float32)


def _direction_table_3d(shape: NoduleShape, n_polar: int = 97, n_azimuth: int = 192) -> np.ndarray:
    polar = np.linspace(0, np.pi, n_polar)
    az = np.arange(n_azimuth) * (2 * np.pi / n_azimuth) - np.pi
    p, a = np.meshgrid(polar, az, indexing="ij")
    u = np.stack([np.cos(p), np.sin(p) * np.sin(a), np.sin(p) * np.cos(a)], -1)  # (z, y, x)
    return shape.radius_of(u).astype(np.float32)  # (n_polar, n_azimuth)


def _boundary_radius(shape: NoduleShape, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance ``rho`` of each pixel from the nodule centre and ``r(u)`` in its direction (mm).

    ``r(u)`` is looked up, with linear interpolation, in a table over directions (diamond angle in
    2D, polar/azimuth angles in 3D), which is exact at the table's nodes.
    """
    rho = np.sqrt((pos * pos).sum(0))  # (N,)
    if pos.shape[0] == 2:
        table = _direction_table_2d(shape)
        n = len(table)
        f = _pseudo_angle(pos[0], pos[1]) * np.float32(n / 4.0)
        i0 = f.astype(np.int64)  # f >= 0
        w = f - i0
        i0 %= n
        r = table[i0] + w * (table[(i0 + 1) % n] - table[i0])
        return rho, r
    z, y, x = pos
    table = _direction_table_3d(shape)
    n_p, n_a = table.shape
    fp = np.arccos(np.clip(z / np.maximum(rho, np.float32(1e-6)), -1, 1)) * np.float32((n_p - 1) / np.pi)
    fa = (np.arctan2(y, x) + np.float32(np.pi)) * np.float32(n_a / (2 * np.pi))
    p0 = np.minimum(np.floor(fp), n_p - 2)
    a0 = np.floor(fa)
    wp, wa = fp - p0, fa - a0
    p0 = p0.astype(np.int64)
    a0 = a0.astype(np.int64) % n_a
    a1 = (a0 + 1) % n_a
    r = (table[p0, a0] * (1 - wp) * (1 - wa) + table[p0 + 1, a0] * wp * (1 - wa)
         + table[p0, a1] * (1 - wp) * wa + table[p0 + 1, a1] * wp * wa)
    return rho, r


def render_nodule(shape: NoduleShape, image: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Composite a nodule onto ``image`` (HU) and return ``(image, mask)``.

    The mask is ``rho <= r(u)`` at pixel centres. Inside, HU follow the texture (solid, part-solid
    with a solid core, ground-glass) and an optional calcified core; the nodule is blended with an
    opacity ``alpha`` that is >= 0.5 exactly on the mask (a one-pixel linear ramp for sharp margins, a
    tanh of width ``edge_mm`` for blurred ones).
    """
    pos = _positions(image.shape, spacing, shape.centre_mm)
    rho, r = _boundary_radius(shape, pos)
    signed = r - rho  # >= 0 inside (mm along the ray)
    mask = signed >= 0
    if shape.sharp:
        alpha = _clip01(np.float32(0.5) + signed / np.float32(min(spacing)))
    else:
        alpha = np.float32(0.5) + np.float32(0.5) * np.tanh(signed / np.float32(shape.edge_mm))
    q = rho / np.maximum(r, np.float32(1e-6))  # 0 at the centre, 1 on the boundary
    if shape.texture == 0:
        hu = np.float32(shape.hu_solid)
    elif shape.texture == 2:
        hu = np.float32(shape.hu_ggo)
    else:  # solid core, a linear transition 0.16 r wide
        core = _clip01(np.float32(0.5) - (q - np.float32(shape.core_frac)) * np.float32(6.25))
        hu = np.float32(shape.hu_ggo) + core * np.float32(shape.hu_solid - shape.hu_ggo)
    if shape.calcified:
        calc = _clip01(np.float32(0.5) - (q - np.float32(shape.calc_frac)) * np.float32(10.0))
        hu = hu + calc * (np.float32(shape.hu_calc) - hu)
    out = image.ravel() + alpha * (hu - image.ravel())
    return out.astype(np.float32, copy=False).reshape(image.shape), mask.reshape(image.shape)


def equivalent_diameter_mm(mask: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """Equivalent-circle (2D) or -sphere (3D) diameter of a mask, and its area (mm^2) or volume (mm^3).

    ``d = 2 sqrt(A / pi)`` with ``A = count * prod(spacing)`` in 2D; ``d = (6 V / pi)^(1/3)`` in 3D.
    """
    size = float(np.count_nonzero(mask)) * float(np.prod(np.asarray(spacing, dtype=np.float64)))
    if mask.ndim == 2:
        return 2.0 * math.sqrt(size / math.pi), size
    return (6.0 * size / math.pi) ** (1.0 / 3.0), size


@functools.lru_cache(maxsize=1)
def _ml_per_mm3() -> float:
    return float(convert(1.0, "mm^3", "mL"))


def nodule_malignancy_rule(calcification: Any, spiculation: Any, texture: Any, diameter_mm: Any) -> Any:
    """The phantom's Lung-RADS-like label rule (numpy arrays, tensors or scalars).

    malignant (1) iff a nodule is present (``diameter_mm > 0``), it is not calcified, and
    ``diameter_mm >= 15`` or it is spiculated or (it is part-solid and ``diameter_mm >= 8``).
    Missing (NaN) concepts only occur without a nodule and give 0.
    """
    if isinstance(diameter_mm, float):  # the per-case fast path
        return int(diameter_mm > 0 and calcification != 1 and (
            diameter_mm >= LARGE_NODULE_MM or spiculation == 1 or (texture == 1 and diameter_mm >= PART_SOLID_NODULE_MM)))
    calc = calcification == 1
    spic = spiculation == 1
    part_solid = texture == 1
    present = diameter_mm > 0
    malignant = present & ~calc & ((diameter_mm >= LARGE_NODULE_MM) | spic | (part_solid & (diameter_mm >= PART_SOLID_NODULE_MM)))
    if isinstance(malignant, torch.Tensor):
        return malignant.long()
    return np.asarray(malignant).astype(np.int64)


def nodule_size_category(diameter_mm: Any) -> Any:
    """Lung-RADS-like size category of a nodule: 0 ``< 8 mm``, 1 ``8-15 mm``, 2 ``>= 15 mm``; NaN without one.

    The cut points are the label rule's (``PART_SOLID_NODULE_MM``, ``LARGE_NODULE_MM``), so the rule
    is a linear threshold of the concepts once the category is one of them:
    ``3 [>= 15] + [8-15] + 2 spiculation + [part-solid] - 10 calcification >= 2``.

    Args:
        diameter_mm: measured diameter(s), a float, numpy array or tensor; 0 means no nodule.

    Returns:
        float level index (or NaN), of the same type and shape as the input.
    """
    if isinstance(diameter_mm, float):  # the per-case fast path
        if not diameter_mm > 0:
            return math.nan
        return float((diameter_mm >= PART_SOLID_NODULE_MM) + (diameter_mm >= LARGE_NODULE_MM))
    if isinstance(diameter_mm, torch.Tensor):
        d = diameter_mm.to(torch.float32)
        level = (d >= PART_SOLID_NODULE_MM).float() + (d >= LARGE_NODULE_MM).float()
        return torch.where(d > 0, level, torch.nan)
    d = np.asarray(diameter_mm, dtype=np.float64)
    level = (d >= PART_SOLID_NODULE_MM).astype(np.float64) + (d >= LARGE_NODULE_MM)
    return np.where(d > 0, level, np.nan)


# ---------------------------------------------------------------------------------------------
# the data set
# ---------------------------------------------------------------------------------------------
class NodulePhantom(Dataset):
    """CT-like lung-nodule patches in HU with exact masks, concepts, measurements and labels.

    Args:
        length: number of cases (synthetic); in ``source="lidc"`` mode, ``None`` = all readings of
            the split, otherwise the first ``length`` of them.
        spatial_dims: 2 or 3.
        size: patch size in pixels (int or per-axis tuple).
        spacing_range: in-plane spacing range (mm) for the synthetic source.
        seed: data-set seed; case ``i`` depends only on ``(seed, i)``.
        source: ``"synthetic"`` or ``"lidc"``.
        p_nodule: probability of a nodule (synthetic); cases without one have an empty mask, label
            0, measurements 0 and NaN concepts.
        label_noise: probability of flipping the rule's label.
        lidc_path: LIDC-IDRI annotation SQLite (else ``$MLMI_ZOO_LIDC``, else the shared default).
        split: LIDC patient split ``"train"``/``"val"``/``"test"`` or ``None`` for all patients.
        **kwargs: further :class:`NodulePhantomConfig` fields (e.g. ``slice_spacing_range``).

    Each sample is ``{"image": (1, *S) float32 HU, "mask": (1, *S) bool, "spacing": (dims,) mm,
    "label": int64, "concepts": {name: float32}, "measurements": {name: float32}, "index": int}``;
    LIDC samples add ``"patient_id"``, ``"reading_id"`` and ``"nodule_id"``.
    """

    label_names: tuple[str, ...] = ("benign", "malignant")

    def __init__(self, length: int | None = None, spatial_dims: int = 2, size: int | tuple[int, ...] = 64,
                 spacing_range: tuple[float, float] = (0.5, 1.0), seed: int = 0, source: str = "synthetic",
                 p_nodule: float = 1.0, label_noise: float = 0.0, lidc_path: str | None = None,
                 split: str | None = None, **kwargs: Any) -> None:
        self.config = NodulePhantomConfig(
            length=length, spatial_dims=spatial_dims, size=size, spacing_range=tuple(spacing_range), seed=seed,
            source=source, p_nodule=p_nodule, label_noise=label_noise,
            lidc_path=None if lidc_path is None else str(lidc_path), split=split, **kwargs)
        self._lidc = None
        if source == "lidc":
            if p_nodule != 1.0:
                raise ValueError(f"p_nodule applies to the synthetic source only; source='lidc' got {p_nodule}")
            from mlmi_zoo.training.datasets.lidc import LidcReadings

            self._lidc = LidcReadings(self.config)
            self._length = len(self._lidc) if length is None else length
            if self._length > len(self._lidc):
                raise ValueError(f"length={length} but split {split!r} holds {len(self._lidc)} LIDC readings; "
                                 f"pass length=None for all of them")
        else:
            self._length = int(length)  # type: ignore[arg-type]

    # -- declarations ---------------------------------------------------------------------------
    @property
    def concept_specs(self) -> tuple[ConceptSpec, ...]:
        """The concepts in each sample's ``concepts`` dict."""
        if self._lidc is not None:
            return self._lidc.concept_specs
        return (
            ConceptSpec("spiculation", "binary", group="margin"),
            ConceptSpec("calcification", "binary", group="density"),
            ConceptSpec("texture", "categorical", levels=TEXTURE_LEVELS, group="density"),
            ConceptSpec("margin_sharp", "binary", group="margin"),
            ConceptSpec("size_category", "ordinal", levels=SIZE_CATEGORY_LEVELS, group="size"),
        )

    @property
    def quantity_specs(self) -> tuple[QuantitySpec, ...]:
        """The measurements in each sample's ``measurements`` dict."""
        size = (QuantitySpec("area_mm2", "mm^2", 0.0, 5000.0) if self.config.spatial_dims == 2
                else QuantitySpec("volume_ml", "mL", 0.0, 200.0))
        return (QuantitySpec("diameter_mm", "mm", 0.0, 100.0), size, QuantitySpec("mean_hu", "HU", -1024.0, 3071.0))

    def __len__(self) -> int:
        return self._length

    # -- drawing ----------------------------------------------------------------------------------
    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, i])

    def _draw(self, rng: np.random.Generator) -> tuple[NoduleShape | None, BackgroundParams, tuple[float, ...], bool]:
        """Draw nodule shape, background, native spacing and the label flip.

        A fixed number of values is drawn whatever the outcome, so every field of a case has its own
        place in the case's random stream.
        """
        cfg = self.config
        dims = cfg.spatial_dims
        u = rng.random(24)
        normals = rng.standard_normal((_N_LOB + _MAX_SPIKES, dims))
        s = cfg.spacing_range[0] + (cfg.spacing_range[1] - cfg.spacing_range[0]) * u[0]
        if dims == 2:
            spacing: tuple[float, ...] = (s, s)
        else:
            lo, hi = cfg.slice_spacing_range
            spacing = (lo + (hi - lo) * u[1], s, s)
        has_nodule = u[2] < cfg.p_nodule
        flip = u[3] < cfg.label_noise
        texture = int(np.searchsorted(np.cumsum(cfg.texture_probs)[:-1], u[4], side="right"))
        calcified = bool(u[5] < cfg.p_calcification)
        spiculated = bool(u[6] < cfg.p_spiculation)
        sharp = bool(u[7] < cfg.p_sharp)
        d_lo, d_hi = cfg.diameter_range_mm[0], cfg.max_diameter_mm
        radius = 0.5 * (d_lo + (d_hi - d_lo) * u[8])
        lob_weights = -np.log(np.maximum(u[9:9 + _N_LOB], 1e-12))  # Dirichlet(1, 1, 1) via exponentials
        lob_amp = lob_weights / lob_weights.sum() * (0.02 + (_LOBULATION_MAX - 0.02) * u[12])
        n_spikes = (6 + int(u[13] * 7)) if spiculated else 0  # 6..12
        spike_u = rng.random((2, _MAX_SPIKES))
        spike_hi = cfg.spike_max_mm
        spike_lo = min(_SPIKE_MM[0], 0.5 * spike_hi)
        shape = NoduleShape(
            centre_mm=_CENTRE_OFFSET_MM * (2.0 * rng.random(dims) - 1.0),
            radius_mm=radius,
            lob_amp=lob_amp,
            lob_dir=_unit(normals[:_N_LOB]),
            lob_freq=1.0 + 1.5 * spike_u[1, :_N_LOB],
            lob_phase=2 * np.pi * spike_u[1, _N_LOB:2 * _N_LOB],
            spike_len_mm=(spike_lo + (spike_hi - spike_lo) * spike_u[0])[:n_spikes],
            spike_dir=_unit(normals[_N_LOB:])[:n_spikes],
            spike_power=40.0 + 50.0 * float(u[14]),
            texture=texture,
            calcified=calcified,
            sharp=sharp,
            hu_solid=50.0 * float(u[15]),
            hu_ggo=-680.0 + 160.0 * float(u[16]),
            hu_calc=300.0 + 600.0 * float(u[17]),
            core_frac=0.35 + 0.25 * float(u[18]),
            calc_frac=0.3 + 0.25 * float(u[19]),
            edge_mm=1.0 + float(u[20]),
        )
        keep_out = radius * (1 + _LOBULATION_MAX) + spike_hi + _CENTRE_OFFSET_MM * math.sqrt(dims)
        bg = draw_background(rng, dims, cfg.min_fov_mm, keep_out, cfg.p_chest_wall)
        return (shape if has_nodule else None), bg, spacing, flip

    def _render(self, i: int, spacing: tuple[float, ...] | None) -> tuple[dict[str, Any], bool]:
        rng = self._rng(i)
        shape, bg, native, flip = self._draw(rng)
        spacing = native if spacing is None else spacing
        grid = self.config.shape
        img = render_background(bg, grid, spacing)
        if shape is not None:
            img, mask = render_nodule(shape, img, spacing)
        else:
            mask = np.zeros(grid, dtype=bool)
        img = img + np.float32(bg.noise_hu) * correlated_noise(rng, grid, bg.noise_smoothing)
        np.maximum(img, np.float32(AIR_HU), out=img)
        if shape is not None:
            concepts = {"spiculation": float(len(shape.spike_len_mm) > 0), "calcification": float(shape.calcified),
                        "texture": float(shape.texture), "margin_sharp": float(shape.sharp)}
        else:
            concepts = dict.fromkeys(("spiculation", "calcification", "texture", "margin_sharp"), math.nan)
        # The diameter as the sample stores it (float32), so category and label agree with it exactly.
        diameter = float(np.float32(equivalent_diameter_mm(mask, spacing)[0]))
        # A property of the object measured at its native spacing, like the label (render() keeps it).
        concepts["size_category"] = nodule_size_category(diameter)
        sample = self._sample(i, img, mask, spacing, concepts)
        clean = int(nodule_malignancy_rule(concepts["calcification"], concepts["spiculation"], concepts["texture"],
                                           diameter))
        sample["label"] = torch.tensor(clean ^ int(flip), dtype=torch.int64)
        return sample, flip

    def _sample(self, i: int, img: np.ndarray, mask: np.ndarray, spacing: Sequence[float],
                concepts: dict[str, float]) -> dict[str, Any]:
        diameter, size = equivalent_diameter_mm(mask, spacing)
        n = np.count_nonzero(mask)
        mean_hu = float(img[mask].sum(dtype=np.float64)) / n if n else 0.0
        meas = {"diameter_mm": diameter}
        if img.ndim == 2:
            meas["area_mm2"] = size
        else:
            meas["volume_ml"] = size * _ml_per_mm3()
        meas["mean_hu"] = mean_hu
        names = list(concepts) + list(meas)
        values = torch.from_numpy(np.array([*concepts.values(), *meas.values()], dtype=np.float32)).unbind()
        scalars = dict(zip(names, values))  # float32 scalar tensors (views of one small buffer)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img)[None]),  # (1, *S)
            "mask": torch.from_numpy(mask[None]),  # (1, *S)
            "spacing": torch.tensor(spacing, dtype=torch.float32),  # (dims,)
            "concepts": {k: scalars[k] for k in concepts},
            "measurements": {k: scalars[k] for k in meas},
            "index": i,
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < self._length:
            raise IndexError(f"index {i} out of range for a NodulePhantom of length {self._length}")
        if self._lidc is not None:
            return self._lidc.sample(i, self._rng(i), None)
        sample, _ = self._render(i, None)
        return _ordered(sample)

    def render(self, i: int, spacing: float | Sequence[float]) -> dict[str, Any]:
        """Render case ``i``'s object (same geometry in mm, same concepts) at another spacing.

        Args:
            i: case index.
            spacing: mm per pixel; a number means the same on every axis, else one per axis
                (``(sy, sx)`` or ``(sz, sy, sx)``).

        Returns:
            A sample like ``self[i]`` at that spacing: mask and measurements are recomputed, the
            label and ``size_category`` are the case's (properties of the object, fixed at its native
            spacing), and the noise is the same draw; the field of view changes with the spacing.
        """
        dims = self.config.spatial_dims
        sp = (float(spacing),) * dims if np.isscalar(spacing) else tuple(float(s) for s in spacing)  # type: ignore[arg-type]
        if len(sp) != dims or min(sp) <= 0:
            raise ValueError(f"spacing must be a positive number or {dims} positive numbers (mm), got {spacing!r}")
        if self._lidc is not None:
            return self._lidc.sample(int(i), self._rng(int(i)), sp)
        sample, _ = self._render(int(i), sp)
        native = self[int(i)]
        sample["label"] = native["label"]
        sample["concepts"]["size_category"] = native["concepts"]["size_category"]
        return _ordered(sample)

    def oracle_label(self, concepts: dict[str, Any], measurements: dict[str, Any]) -> Any:
        """The label rule applied to (batched) ground-truth concepts and measurements, without noise."""
        if self._lidc is not None:
            raise ValueError("LIDC labels are radiologist malignancy ratings, not a rule of the concepts")
        return nodule_malignancy_rule(concepts["calcification"], concepts["spiculation"], concepts["texture"],
                                      measurements["diameter_mm"])


_KEY_ORDER = ("image", "mask", "spacing", "label", "concepts", "measurements", "index")


def _ordered(sample: dict[str, Any]) -> dict[str, Any]:
    out = {k: sample[k] for k in _KEY_ORDER}
    out.update({k: v for k, v in sample.items() if k not in out})
    return out

"""The synthetic nodule body: a star-shaped object defined in millimetres, and its rendering in HU.

A point at distance ``rho`` in unit direction ``u`` from the centre is inside iff ``rho <= r(u)`` with
``r(u) = R (1 + lobulation(u)) + spikes(u)`` (see :class:`NoduleShape` and ``PHANTOMS.md`` §1, steps 2
and 4); texture (solid, part-solid, ground-glass), an optional calcified core and a sharp or blurred
margin set its HU. The phantom's stand-in for a lung nodule of low-dose chest CT (LIDC-IDRI, Armato et
al., Medical Physics 2011); what we changed: the closed form is tabulated over directions and
interpolated, so the table, not the formula, is the object, which makes rendering fast and exactly
reproducible at any spacing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mlmi_zoo.training.datasets._grid import clip01, positions, unit_rows

__all__ = ["NoduleShape", "render_nodule"]


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
    return unit_rows(np.stack([t, x], 1))


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
    pos = positions(image.shape, spacing, shape.centre_mm)
    rho, r = _boundary_radius(shape, pos)
    signed = r - rho  # >= 0 inside (mm along the ray)
    mask = signed >= 0
    if shape.sharp:
        alpha = clip01(np.float32(0.5) + signed / np.float32(min(spacing)))
    else:
        alpha = np.float32(0.5) + np.float32(0.5) * np.tanh(signed / np.float32(shape.edge_mm))
    q = rho / np.maximum(r, np.float32(1e-6))  # 0 at the centre, 1 on the boundary
    if shape.texture == 0:
        hu = np.float32(shape.hu_solid)
    elif shape.texture == 2:
        hu = np.float32(shape.hu_ggo)
    else:  # solid core, a linear transition 0.16 r wide
        core = clip01(np.float32(0.5) - (q - np.float32(shape.core_frac)) * np.float32(6.25))
        hu = np.float32(shape.hu_ggo) + core * np.float32(shape.hu_solid - shape.hu_ggo)
    if shape.calcified:
        calc = clip01(np.float32(0.5) - (q - np.float32(shape.calc_frac)) * np.float32(10.0))
        hu = hu + calc * (np.float32(shape.hu_calc) - hu)
    out = image.ravel() + alpha * (hu - image.ravel())
    return out.astype(np.float32, copy=False).reshape(image.shape), mask.reshape(image.shape)

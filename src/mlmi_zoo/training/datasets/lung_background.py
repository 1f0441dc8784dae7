"""The lung around a phantom nodule: parenchyma, vessels, chest wall and correlated CT noise, in HU.

A procedural stand-in for the background of a low-dose chest CT patch (the setting of LIDC-IDRI,
Armato et al., Medical Physics 2011; see ``PHANTOMS.md`` §1, steps 5 and 6): parenchyma at about
-850 HU with a smooth low-frequency variation, a few slightly curved in-plane vessels, an optional
chest wall, and stationary noise. What we changed with respect to a real CT: no anatomy beyond that
(vessels do not branch, the noise does not depend on the position). Every object is defined in
millimetres, so the same background can be rendered at any spacing. Used by both nodule sources
(:mod:`.phantoms` and :mod:`.lidc`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mlmi_zoo.training.datasets._grid import centred_axes, clip01, positions, unit_rows

__all__ = ["AIR_HU", "BackgroundParams", "correlated_noise", "draw_background", "render_background"]

AIR_HU = -1024.0  # CT numbers are clipped here, as scanners do


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
    wave_k = unit_rows(normals[:3]) * (2 * np.pi / (15.0 + 45.0 * u[1:4, None]))
    direction = unit_rows(normals[4:4 + _MAX_VESSELS])[:n_vessels]
    perp = normals[4 + _MAX_VESSELS:][:n_vessels]
    perp = unit_rows(perp - (perp * direction).sum(1, keepdims=True) * direction)
    wall = None
    if u[7] < p_chest_wall:
        wall = (unit_rows(normals[3:4])[0], keep_out_mm + 2.0 + 6.0 * u[8], 0.02 * u[9])
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
    axes = [(ax * np.float32(s) - np.float32(c)).astype(np.float64) for ax, s, c in zip(centred_axes(shape), spacing, centre)]
    if dims == 2:  # cos(a + b + phi) = cos(a + phi) cos(b) - sin(a + phi) sin(b): two small matmuls
        ay = np.outer(axes[0], bg.wave_k[:, 0]) + bg.wave_phase  # (H, W_waves)
        bx = np.outer(axes[1], bg.wave_k[:, 1])  # (W, W_waves)
        waves = (np.cos(ay) * bg.wave_amp) @ np.cos(bx).T - (np.sin(ay) * bg.wave_amp) @ np.sin(bx).T
    else:
        factors = [np.exp(1j * np.outer(x, bg.wave_k[:, a])) for a, x in enumerate(axes)]  # (n_a, W_waves)
        factors[0] = factors[0] * (bg.wave_amp * np.exp(1j * bg.wave_phase))
        waves = np.einsum("aw,bw,cw->abc", *factors).real
    img = (waves.astype(np.float32) + np.float32(bg.base_hu)).ravel()  # (N,)
    pos = positions(shape, spacing, centre)  # (dims, N)
    pos2 = (pos * pos).sum(0)  # (N,) |x|^2, for 3D vessels and the chest wall
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
    alpha = clip01(np.float32(0.5) + (r * r - dist2) / (np.float32(0.8) * r))
    img = img + (alpha * (col(bg.vessel_hu) - img)).max(0)
    if bg.wall is not None:
        normal, dist, curv = bg.wall
        along_w = normal.astype(np.float32) @ pos
        depth = along_w + np.float32(curv) * (pos2 - along_w * along_w) - np.float32(dist)
        alpha_w = clip01(np.float32(0.5) + depth)  # 1 mm edge
        img = img + alpha_w * (np.float32(40.0) - img)
    return img.reshape(shape)

"""Radiologists' contour polygons -> pixel masks: even-odd rasterisation on any sample grid.

A LIDC-IDRI reading (:mod:`.lidc_index`) outlines a nodule slice by slice with *inclusion* polygons
and cuts holes with *exclusion* ones (Armato et al., Medical Physics 38(2), 2011). A slice's mask is
the union of its inclusion polygons, edges included, minus the open interior of its exclusion
polygons; sampling the polygons on a grid of any spacing (rather than the scan's pixels only) is
what lets :mod:`.lidc` render a reading at another spacing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["rasterise_polygon", "shoelace_area"]


def shoelace_area(points: np.ndarray) -> float:
    """Area of the closed polygon through ``points`` ``(n, 2)`` (in the points' units squared)."""
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def rasterise_polygon(points: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                      closed: bool = True) -> np.ndarray:
    """Which sample points of a grid lie inside a polygon (even-odd rule).

    Args:
        points: ``(n, 2)`` polygon vertices as (x = column, y = row), closed implicitly.
        rows: ``(H,)`` row coordinates of the grid, in the same units as ``points``.
        cols: ``(W,)`` column coordinates of the grid.
        closed: include grid points lying on the polygon's edges (a closed set); ``False`` gives the
            open interior.

    Returns:
        ``(H, W)`` bool.
    """
    p = points.astype(np.float64)
    q = np.roll(p, -1, axis=0)
    x0, y0, x1, y1 = p[:, 0], p[:, 1], q[:, 0], q[:, 1]
    yr = rows.astype(np.float64)[:, None]  # (H, 1)
    spans = ((y0 <= yr) & (yr < y1)) | ((y1 <= yr) & (yr < y0))  # (H, E), half-open: no double counts
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = np.where(spans, x0 + (yr - y0) * (x1 - x0) / (y1 - y0), np.inf)  # (H, E)
    xc = cols.astype(np.float64)
    inside = ((x_cross[:, None, :] > xc[None, :, None]) & np.isfinite(x_cross)[:, None, :]).sum(-1) % 2 == 1
    # grid points on an edge: collinear with it and within its bounding box (tolerance 1e-9 px^2)
    yy, xx = yr[:, :, None], xc[None, :, None]  # (H, 1, 1), (1, W, 1)
    cross = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)  # (H, W, E)
    on_edge = (np.abs(cross) <= 1e-9) & (xx >= np.minimum(x0, x1) - 1e-9) & (xx <= np.maximum(x0, x1) + 1e-9) \
        & (yy >= np.minimum(y0, y1) - 1e-9) & (yy <= np.maximum(y0, y1) + 1e-9)
    boundary = on_edge.any(-1)
    return (inside | boundary) if closed else (inside & ~boundary)


def _rasterise_slice(contours: Sequence[tuple[bool, np.ndarray]], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """One slice: union of inclusion polygons (closed) minus the open interior of exclusion ones."""
    mask = np.zeros((len(rows), len(cols)), dtype=bool)
    for inclusion, pts in contours:
        if inclusion:
            mask |= rasterise_polygon(pts, rows, cols, closed=True)
    for inclusion, pts in contours:
        if not inclusion:
            mask &= ~rasterise_polygon(pts, rows, cols, closed=False)
    return mask


def _by_slice(contours: list[tuple[float, bool, np.ndarray]]) -> dict[float, list[tuple[bool, np.ndarray]]]:
    """A reading's ``(z_mm, inclusion, points)`` contours grouped by slice position (z to 1e-3 mm)."""
    out: dict[float, list[tuple[bool, np.ndarray]]] = {}
    for z, incl, pts in contours:
        out.setdefault(round(z, 3), []).append((incl, pts))
    return out

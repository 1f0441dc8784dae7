"""Plumbing of the nodule phantom: pixel-centre coordinates in millimetres, and two small array helpers.

Shared by the background (:mod:`.lung_background`) and the nodule body (:mod:`.nodule_shape`), which
both evaluate closed-form objects defined in mm at the pixel centres of a patch.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

__all__ = ["centred_axes", "centred_grid", "clip01", "positions", "unit_rows"]


def clip01(a: np.ndarray) -> np.ndarray:
    """``np.clip(a, 0, 1)`` in place for a fresh temporary: the same values, without np.clip's call overhead."""
    np.maximum(a, 0.0, out=a)
    return np.minimum(a, 1.0, out=a)


def unit_rows(v: np.ndarray) -> np.ndarray:
    """Rows of ``v`` scaled to unit length."""
    return v / np.maximum(np.sqrt((v * v).sum(1, keepdims=True)), 1e-12)


@functools.lru_cache(maxsize=32)
def centred_axes(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Per-axis pixel indices relative to the patch centre (1D float32 arrays)."""
    return tuple(np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2.0) for n in shape)


@functools.lru_cache(maxsize=32)
def centred_grid(shape: tuple[int, ...]) -> np.ndarray:
    """Pixel-centre indices relative to the patch centre, flattened: ``(dims, N)`` float32."""
    grids = np.meshgrid(*centred_axes(shape), indexing="ij")
    return np.ascontiguousarray(np.stack([g.ravel() for g in grids], 0))


def positions(shape: tuple[int, ...], spacing: Sequence[float], centre: np.ndarray) -> np.ndarray:
    """mm coordinates of all pixel centres relative to ``centre``: ``(dims, N)`` float32."""
    sp = np.asarray(spacing, dtype=np.float32)[:, None]
    return centred_grid(shape) * sp - np.asarray(centre, dtype=np.float32)[:, None]

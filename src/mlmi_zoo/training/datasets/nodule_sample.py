"""A nodule case as a sample dict, shared by both nodule sources (synthetic phantom and LIDC readings).

The measurements are taken from the lesion mask at the true spacing (``PHANTOMS.md``, "Ground truth"):
the equivalent-circle (2D) or -sphere (3D) diameter, the area in mm^2 or the volume in mL (converted
with pint), and the mean HU over the mask; the keys come in one fixed order.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import numpy as np
import torch

from mlmi_zoo.units import convert

__all__ = ["KEY_ORDER", "equivalent_diameter_mm", "nodule_sample", "ordered"]

KEY_ORDER = ("image", "mask", "spacing", "label", "concepts", "measurements", "index")


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


def nodule_sample(i: int, img: np.ndarray, mask: np.ndarray, spacing: Sequence[float],
                  concepts: dict[str, float]) -> dict[str, Any]:
    """A rendered nodule case as a sample dict: the image, its mask, the measurements taken from them.

    Args:
        i: case index.
        img: ``(*S)`` float32 image in HU.
        mask: ``(*S)`` bool lesion mask.
        spacing: mm per array axis.
        concepts: concept name -> value (float, NaN = missing).

    Returns:
        ``{"image", "mask", "spacing", "concepts", "measurements", "index"}``; the caller adds the label.
    """
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


def ordered(sample: dict[str, Any]) -> dict[str, Any]:
    """``sample`` with the keys of :data:`KEY_ORDER` first, in that order, then the source's own keys."""
    out = {k: sample[k] for k in KEY_ORDER}
    out.update({k: v for k, v in sample.items() if k not in out})
    return out

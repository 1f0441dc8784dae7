"""The nodule phantom's Lung-RADS-like label rule and size category.

American College of Radiology, Lung-RADS v1.1 (2019), simplified (see ``PHANTOMS.md``, "Label rule"):
a nodule is malignant iff it is not calcified and it is large (>= 15 mm), spiculated, or part-solid and
>= 8 mm. What we changed: one rule on the phantom's ground-truth concepts and measured diameter, no
follow-up categories; the size category cuts the diameter at the rule's own thresholds, so the rule is
a linear threshold of the concepts.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["LARGE_NODULE_MM", "PART_SOLID_NODULE_MM", "nodule_malignancy_rule", "nodule_size_category"]

# Lung-RADS-like thresholds of the label rule (see nodule_malignancy_rule and PHANTOMS.md).
LARGE_NODULE_MM = 15.0
PART_SOLID_NODULE_MM = 8.0


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

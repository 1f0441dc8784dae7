"""Localization: does the evidence lie where the lesion is?

The localization element of Wang et al., "A Framework for Interpretability in Machine Learning for
Medical Imaging" (arXiv 2310.01685; IEEE Access 2024), measured against ground-truth masks and labels:

* :func:`activation_precision` — share of a map's top pixels inside the lesion mask, from Barnett et
  al., "A case-based interpretable deep learning model for classification of mass lesions in digital
  mammography" (IAIA-BL), Nature Machine Intelligence 2021;
* :func:`pointing_game` — does the map's maximum fall on the lesion, from Zhang et al., "Top-down
  neural attention by excitation backprop", ECCV 2016;
* :func:`instance_auroc` — instance-level AUROC and average precision of a multiple-instance model's
  instance scores against instance labels (scikit-learn's ``roc_auc_score`` and
  ``average_precision_score``).

What we changed: ties in the top set and the arg-max are broken deterministically (lower flat index
first), the pointing game takes an optional tolerance in pixels, and a case with an empty mask (or a
set of instances with a single class) scores NaN instead of raising.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from sklearn.metrics import average_precision_score, roc_auc_score

from mlmi_zoo.evaluation._arrays import ArrayLike, _descending_order, _np, _tensor

__all__ = ["activation_precision", "instance_auroc", "pointing_game"]


def _match_mask(maps: torch.Tensor, masks: torch.Tensor, name: str = "masks") -> tuple[torch.Tensor, torch.Tensor]:
    """Bring maps (B, *spatial) and masks (B, *spatial) or (B, 1, *spatial) to the same shape."""
    if masks.ndim == maps.ndim + 1 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if maps.ndim == masks.ndim + 1 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.shape != masks.shape:
        raise ValueError(
            f"maps and {name} must share their shape (B, *spatial); got maps {tuple(maps.shape)} and "
            f"{name} {tuple(masks.shape)}. Resize the maps to the mask resolution first."
        )
    if maps.ndim < 2:
        raise ValueError(f"maps must be (B, *spatial); got shape {tuple(maps.shape)}")
    if torch.isnan(maps.float()).any():
        raise ValueError("maps contain NaN; a saliency map must be finite everywhere")
    return maps, masks.bool()


def activation_precision(maps: ArrayLike, masks: ArrayLike, q: float = 0.05) -> torch.Tensor:
    """Share of each map's top-``q`` pixels/voxels that lie inside the ground-truth mask.

    The top set holds ``k = max(1, ceil(q * N))`` of the ``N`` pixels, taken by decreasing map value.
    Ties are broken deterministically: among equal values the pixel with the lower flat (row-major)
    index is taken first. A map that is perfectly on the lesion scores 1 only if the lesion holds at
    least ``k`` pixels.

    Args:
        maps: (B, *spatial) or (B, 1, *spatial) saliency/similarity maps at mask resolution.
        masks: (B, *spatial) or (B, 1, *spatial) boolean lesion masks.
        q: fraction of pixels in the top set, in (0, 1].

    Returns:
        (B,) float64 precision in [0, 1]; NaN for cases whose mask is empty (callers skip them).
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be a fraction in (0, 1]; got {q}")
    maps, masks = _match_mask(_tensor(maps).float(), _tensor(masks))
    flat_maps = rearrange(maps, "b ... -> b (...)")  # (B, N)
    flat_masks = rearrange(masks, "b ... -> b (...)")  # (B, N)
    k = max(1, math.ceil(q * flat_maps.shape[1]))
    top = _descending_order(flat_maps)[:, :k]  # (B, k)
    inside = flat_masks.gather(1, top).double().mean(1)  # (B,)
    return torch.where(flat_masks.any(1), inside, torch.full_like(inside, math.nan))


def pointing_game(maps: ArrayLike, masks: ArrayLike, tolerance_px: int = 0) -> torch.Tensor:
    """1 if the arg-max of the map falls in the (optionally dilated) mask, else 0.

    The arg-max is the first maximal pixel in row-major order (deterministic for ties). With
    ``tolerance_px = t`` the mask is dilated by a (2t+1)^d square/cube, i.e. a hit within Chebyshev
    distance ``t`` of the lesion counts.

    Args:
        maps: (B, *spatial) or (B, 1, *spatial) saliency maps; spatial is 1-3 dimensional.
        masks: (B, *spatial) or (B, 1, *spatial) boolean lesion masks.
        tolerance_px: dilation radius in pixels/voxels.

    Returns:
        (B,) float64 of 0/1 hits; NaN for cases whose mask is empty.
    """
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0; got {tolerance_px}")
    maps, masks = _match_mask(_tensor(maps).float(), _tensor(masks))
    dims = maps.ndim - 1
    if tolerance_px > 0:
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}.get(dims)
        if pool is None:
            raise ValueError(f"tolerance_px needs 1-3 spatial dimensions; got {dims}")
        dilated = pool(masks.float().unsqueeze(1), 2 * tolerance_px + 1, stride=1, padding=tolerance_px)
        dilated = dilated.squeeze(1) > 0
    else:
        dilated = masks
    flat_maps = rearrange(maps, "b ... -> b (...)")  # (B, N)
    hit = rearrange(dilated, "b ... -> b (...)").gather(1, flat_maps.argmax(1, keepdim=True))[:, 0]  # (B,)
    non_empty = rearrange(masks, "b ... -> b (...)").any(1)
    return torch.where(non_empty, hit.double(), torch.full(hit.shape, math.nan, dtype=torch.float64))


def instance_auroc(scores: ArrayLike, instance_labels: ArrayLike, mask: ArrayLike | None = None) -> dict[str, float]:
    """Instance-level AUROC and average precision, pooled over all valid instances of all bags.

    Args:
        scores: (B, N) instance scores (attention, contribution to the positive class, ...).
        instance_labels: (B, N) 0/1 instance labels; NaN marks an instance without a label (skipped).
        mask: (B, N) bool, True for real instances, False for padding; None means all are real.

    Returns:
        ``{"auroc", "ap", "n_instances", "n_positive"}``; AUROC and AP are NaN when the valid
        instances hold a single class.
    """
    s, y = _np(scores), _np(instance_labels)
    if s.shape != y.shape:
        raise ValueError(f"scores and instance_labels must share a shape (B, N); got {s.shape} and {y.shape}")
    valid = np.ones(s.shape, dtype=bool) if mask is None else _np(mask, bool)
    if valid.shape != s.shape:
        raise ValueError(f"mask must have the shape of scores {s.shape}; got {valid.shape}")
    valid &= ~np.isnan(y)
    s, y = s[valid], y[valid]
    if np.isnan(s).any():
        raise ValueError("scores of valid instances contain NaN; check the mask and the model output")
    n_pos = int((y == 1).sum())
    both = 0 < n_pos < y.size
    return {
        "auroc": float(roc_auc_score(y, s)) if both else math.nan,
        "ap": float(average_precision_score(y, s)) if both else math.nan,
        "n_instances": int(y.size),
        "n_positive": n_pos,
    }

"""Plumbing shared by the metric modules: array conversion, deterministic ordering, class indices."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

ArrayLike = Any  # torch.Tensor, numpy array or a nested sequence of numbers


def _np(x: ArrayLike, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


def _descending_order(values: torch.Tensor) -> torch.Tensor:
    """(B, N) indices that sort each row by decreasing value; ties keep the lower flat index first."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def _class_index(index: int | Sequence[int] | torch.Tensor | None, batch: int, fallback: torch.Tensor) -> torch.Tensor:
    """(B,) long class indices from an int, a sequence, a tensor, or ``fallback`` when None."""
    if index is None:
        return fallback.long()
    idx = torch.as_tensor(index, dtype=torch.long, device=fallback.device)
    if idx.ndim == 0:
        idx = idx.expand(batch)
    if idx.shape != (batch,):
        raise ValueError(f"class index must be an int or have shape ({batch},); got shape {tuple(idx.shape)}")
    return idx

"""Moving a collated batch to the run's device (plumbing shared by the training and validation loops)."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["to_device"]


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with its tensors on ``device``: a tensor, a dict of them, or a list/tuple of tensors.

    Anything else (case ids, strings) is returned as it is.
    """
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        return type(batch)(to_device(v, device) for v in batch)
    return batch

"""Moving a collated batch to the run's device (plumbing shared by the training and validation loops)."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["channels_last", "prefers_channels_last", "to_device"]


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


def prefers_channels_last(model: torch.nn.Module) -> bool:
    """Whether ``model`` trains faster channels-last: it holds a depthwise convolution.

    Measured by ``bench/bench_memory_format.py`` (one training step, same process, CPU, 2 threads):
    EfficientNet-Lite0 at 256 px, whose blocks are depthwise-separable, runs 1.6-1.8x faster
    channels-last; the zoo's ResNet-8 in 2-D and 3-D (dense 3x3 convolutions) runs at 0.89-1.06x,
    no gain, so it keeps PyTorch's default layout.
    """
    return any(isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and m.groups > 1 and m.groups == m.in_channels
               for m in model.modules())


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Keep ``model``'s 4-D and 5-D parameters and buffers channels-last, in place; return ``model``.

    A convolution whose weight is channels-last runs in that layout (oneDNN on CPU, cuDNN on GPU)
    and hands it on to the next layer: the same arithmetic in another order, faster for depthwise
    convolutions (:func:`prefers_channels_last`). Written by hand because
    ``nn.Module.to(memory_format=...)`` takes one format for every tensor and refuses a model that holds both 4-D tensors (2-D convolutions, ProtoPNet's
    prototypes) and 5-D ones (3-D convolutions). The ``Parameter`` objects stay the same, so an
    optimiser built before or after sees them; ``state_dict`` and saved weights are made
    contiguous when written (:func:`mlmi_zoo._weights.save_weights`).
    """
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            fmt = formats.get(tensor.dim())
            if fmt is not None and not tensor.is_contiguous(memory_format=fmt):
                tensor.data = tensor.data.contiguous(memory_format=fmt)
    return model

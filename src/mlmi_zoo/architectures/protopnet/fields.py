"""Which input pixels one latent cell of a ProtoPNet sees: its true and its effective receptive field.

The true (theoretical) field is every input pixel with a non-zero gradient of the cell's latent vector;
the effective field is the smallest centred box holding half of the gradient magnitude (Luo, Li, Urtasun,
Zemel, "Understanding the effective receptive field in deep convolutional neural networks", NeurIPS
2016). The stride window a push record stores (``box_px``) is only a lower bound of both; the gallery
draws all three and the evaluation reports them.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["FIELD_PROBES", "cell_fields", "receptive_field"]


FIELD_PROBES = 4  # random inputs whose non-zero gradients are added to the image's for the true field


def cell_fields(model: Any, image: torch.Tensor, location: Sequence[int]) -> dict[str, list[list[int]]]:
    """The input region one latent cell depends on, by gradient of that cell's latent vector.

    Args:
        model: a ProtoPNet.
        image: (C, *spatial) the image after the model's intensity transform.
        location: the cell's latent index per axis.

    Returns:
        ``theoretical_px``: the bounding box of every pixel with a non-zero gradient, on the image or on
        any of ``FIELD_PROBES`` uniform random inputs (a ReLU that is off on one image hides part of the
        field on that image only): the true receptive field, clipped to the image. ``effective_px``:
        on the image itself, the smallest box centred on the gradient's peak that holds half of its
        magnitude (Luo et al. 2016), within the true field. Half-open ``[start, stop)`` per spatial
        axis. The stride window drawn for the cell's map value is only a lower bound of both.
    """
    def gradient(x: torch.Tensor) -> torch.Tensor:
        x = x[None].detach().clone().requires_grad_(True)
        with torch.enable_grad():  # the gradient reaches the input only: the weights' .grad stay untouched
            z = model.latent(x)
            (g,) = torch.autograd.grad(z[(0, slice(None), *(int(v) for v in location))].pow(2).sum(), x)
        return g.abs().sum(1)[0]  # (*spatial)

    grad = gradient(image)
    reach = grad > 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(FIELD_PROBES):
        reach |= gradient(torch.rand(image.shape, generator=generator).to(image)) > 0
    shape = tuple(grad.shape)
    nonzero = torch.nonzero(reach)
    if not len(nonzero):
        full = [[0, n] for n in shape]
        return {"theoretical_px": full, "effective_px": full}
    theoretical = [[int(nonzero[:, a].min()), int(nonzero[:, a].max()) + 1] for a in range(grad.ndim)]
    grad = grad * reach
    total, effective = float(grad.sum()), theoretical
    if total > 0:
        peak = [int(v) for v in torch.nonzero(grad == grad.max())[0]]
        for half in range(max(shape)):
            box = [[max(lo, c - half), min(hi, c + half + 1)] for c, (lo, hi) in zip(peak, theoretical)]
            if float(grad[tuple(slice(a, b) for a, b in box)].sum()) >= 0.5 * total:
                effective = box
                break
    return {"theoretical_px": theoretical, "effective_px": effective}


def receptive_field(model: Any) -> dict[str, Any]:
    """The input region that the centre latent cell sees, by gradient (:func:`cell_fields`): the
    theoretical field (every input pixel with a non-zero gradient on a mid-grey input or on random
    inputs) and the effective field (the smallest centred box holding half of the gradient magnitude
    on the mid-grey input; Luo et al., "Understanding the effective receptive field in deep
    convolutional neural networks", NeurIPS 2016), per spatial axis, in pixels, with the model's
    weights and input size."""
    shape = tuple(int(s) for s in (model.input_spec.size or ()))
    if not shape:
        return {}
    x = torch.full((model.input_spec.in_channels, *shape), 0.5)
    with torch.no_grad():
        latent = tuple(model.latent(x[None]).shape[2:])
    field = cell_fields(model, x, tuple(n // 2 for n in latent))
    theoretical = [b - a for a, b in field["theoretical_px"]]
    effective = [b - a for a, b in field["effective_px"]]
    return {"input_px": list(shape), "latent_shape": list(latent), "theoretical_px": theoretical,
            "effective_px": effective,
            "theoretical_share_of_input": float(np.prod(theoretical) / np.prod(shape)) if theoretical else math.nan}

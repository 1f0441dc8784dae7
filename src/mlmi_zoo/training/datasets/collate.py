"""Batching of variable-size bags for multiple-instance learning (Ilse et al., ICML 2018).

``collate_bags`` pads every per-instance field to the largest bag of the batch and adds a boolean
``mask`` (True = real instance), so attention can be masked and bag sums stay exact.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import default_collate

__all__ = ["collate_bags", "INSTANCE_KEYS"]

INSTANCE_KEYS = ("tiles", "feats", "coords", "instance_labels", "instance_area_mm2")


def collate_bags(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate bags of different sizes into one padded batch.

    Args:
        samples: bag dicts as returned by :class:`~mlmi_zoo.training.datasets.tilebag.TileBagPhantom`;
            per-instance fields (``tiles`` (N, 3, t, t), ``feats`` (N, D), ``coords`` (N, 2),
            ``instance_labels`` (N,), ``instance_area_mm2`` (N,)) may differ in N.

    Returns:
        The same keys with per-instance fields padded with zeros to ``(B, N_max, ...)``, plus
        ``mask`` ``(B, N_max)`` bool; ``instance_controls`` (a dict of ``(N,)`` control scores per
        instance, see :mod:`mlmi_zoo.evaluation.controls`) padded the same way; every other field (``label``, ``measurements``, ``index``, ...)
        batched by :func:`torch.utils.data.default_collate`.

    Raises:
        ValueError: for an empty batch, or bags whose instance fields disagree on N.
    """
    if not samples:
        raise ValueError("collate_bags needs at least one bag, got an empty batch")
    keys = [k for k in INSTANCE_KEYS if k in samples[0]]
    if not keys:
        raise ValueError(f"bags must hold at least one of {INSTANCE_KEYS}; got keys {sorted(samples[0])}")
    sizes = []
    for j, s in enumerate(samples):
        n = {k: int(s[k].shape[0]) for k in keys}
        if len(set(n.values())) != 1:
            raise ValueError(f"bag {j}: instance fields disagree on the number of instances: {n}")
        sizes.append(next(iter(n.values())))
    n_max = max(sizes)
    out: dict[str, Any] = {}
    for k in keys:
        first = samples[0][k]
        padded = first.new_zeros((len(samples), n_max, *first.shape[1:]))  # (B, N_max, ...)
        for j, s in enumerate(samples):
            padded[j, : sizes[j]] = s[k]
        out[k] = padded
    out["mask"] = torch.arange(n_max)[None, :] < torch.tensor(sizes)[:, None]  # (B, N_max)
    if "instance_controls" in samples[0]:  # name -> (N,) per-instance control scores, padded like the rest
        names = list(samples[0]["instance_controls"])
        controls = {name: torch.zeros(len(samples), n_max) for name in names}
        for j, s in enumerate(samples):
            for name in names:
                controls[name][j, : sizes[j]] = torch.as_tensor(s["instance_controls"][name], dtype=torch.float32)
        out["instance_controls"] = controls
        keys = [*keys, "instance_controls"]
    rest = [{k: v for k, v in s.items() if k not in keys} for s in samples]
    out.update(default_collate(rest))
    return out

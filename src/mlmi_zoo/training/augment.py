"""Training-time augmentation that keeps every ground-truth field true.

``dihedral``: each training case is flipped and/or turned by a multiple of 90 degrees in the image
plane (the last two spatial axes; in 3D every slice alike), one of the 8 symmetries of the square,
chosen by ``(seed, epoch, case index)`` (on non-square planes only the four that keep the shape:
identity, half turn and the two flips). Image and mask move together, the in-plane spacing is
swapped on a quarter turn, and concepts, measurements and labels are unchanged: a nodule's
spiculation, calcification, diameter and malignancy do not depend on its orientation in the slice.
Validation, test, push and every other pass over the data see the cases as they are.

Because the choice is a function of ``(seed, epoch, index)``, an epoch resumed after a crash sees
the same transforms, and any number of loader workers gives the same batches.
"""
from __future__ import annotations

from collections.abc import Sized
from typing import Any

import torch
from torch.utils.data import Dataset

from mlmi_zoo.training.data_spec import SizedDataset
from mlmi_zoo.training.distributed import derive_seed

__all__ = ["AUGMENTATIONS", "DihedralAugment", "dihedral", "augmented"]

AUGMENTATIONS = ("dihedral",)
_SPATIAL_KEYS = ("image", "mask")  # fields whose last two axes are the image plane


def dihedral(sample: dict[str, Any], k: int) -> dict[str, Any]:
    """Apply symmetry ``k`` in ``0..7`` to a sample: flip the last axis if ``k >= 4``, then turn ``k % 4`` quarter turns.

    Args:
        sample: a data-set sample with ``"image"`` (C, *S) and optionally ``"mask"`` (1, *S) and
            ``"spacing"`` (dims,); other fields are passed through.
        k: the symmetry; 0 is the identity.

    Returns:
        A new dict (the input is not modified).
    """
    if not 0 <= k < 8:
        raise ValueError(f"a dihedral symmetry index is in 0..7, got {k}")
    out = dict(sample)
    for key in _SPATIAL_KEYS:
        value = sample.get(key)
        if value is None:
            continue
        value = torch.as_tensor(value)
        if value.ndim < 3:
            raise ValueError(f"dihedral augmentation needs {key!r} as (C, *spatial) with >= 2 spatial axes, "
                             f"got shape {tuple(value.shape)}")
        if k >= 4:
            value = value.flip(-1)
        out[key] = torch.rot90(value, k % 4, dims=(-2, -1)).contiguous()
    spacing = sample.get("spacing")
    if spacing is not None and k % 2 == 1:
        spacing = torch.as_tensor(spacing).clone()
        spacing[..., -2:] = spacing[..., -2:].flip(-1).clone()
        out["spacing"] = spacing
    return out


class DihedralAugment(SizedDataset[dict[str, Any]]):
    """A view of a training set whose case ``i`` is transformed by symmetry ``hash(seed, epoch, i) % 8``.

    Args:
        dataset: the training split.
        seed: the recipe's seed.
        epoch: the global epoch being trained.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if not isinstance(self.dataset, Sized):
            raise TypeError(f"object of type {type(self.dataset).__name__!r} has no len()")  # what len() raises
        return len(self.dataset)

    def symmetry(self, i: int) -> int:
        """The symmetry applied to case ``i`` in this epoch."""
        return derive_seed(self.seed, "dihedral", self.epoch, int(i)) % 8

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.dataset[i]
        k = self.symmetry(i)
        shape = torch.as_tensor(sample["image"]).shape
        if shape[-1] != shape[-2]:  # a quarter turn would change the shape: keep the 4 that do not
            k -= k % 2
        return dihedral(sample, k)


def augmented(dataset: Dataset, kind: str | None, seed: int, epoch: int) -> Dataset:
    """The training set of one epoch: ``dataset`` itself when ``kind`` is None, else its augmented view.

    Raises:
        ValueError: for an unknown ``kind``.
    """
    if kind is None:
        return dataset
    if kind == "dihedral":
        return DihedralAugment(dataset, seed, epoch)
    raise ValueError(f"unknown augmentation {kind!r}; expected one of {AUGMENTATIONS} or null")

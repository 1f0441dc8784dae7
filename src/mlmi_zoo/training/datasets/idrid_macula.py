"""IDRiD's macula set: what a macular-edema model learns from, joined from the two IDRiD sets.

Data: IDRiD (P. Porwal et al., Data 3(3):25, 2018; Medical Image Analysis 59:101561, 2020; CC BY 4.0), read
by :mod:`mlmi_zoo.training.datasets.idrid`, whose docstring states the grids, the field of view and the
optic-disc-diameter unit used here.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mlmi_zoo.training.data_spec import SizedDataset
from mlmi_zoo.training.datasets.idrid import (DEFAULT_SIZE, GRADING_TASKS, LESIONS, IDRiDGrading, IDRiDSegmentation,
                                              _check_split)

__all__ = ["IDRiDMacula"]


class IDRiDMacula(SizedDataset[dict[str, Any]]):
    """What a macular-edema model learns from: exudate masks from one set, fovea and DME risk from the other.

    The DME risk is defined by hard exudates relative to the fovea, but no IDRiD photograph has both:
    the segmentation photographs have exudate masks and no fovea, the grading photographs the fovea
    and the DME risk and no mask. ``"train"`` and ``"val"`` therefore hold both sets' photographs of
    that split (segmentation first, then grading), every sample with the same keys, and what a
    photograph does not have is marked missing: ``"label"`` -1 and ``"fovea_xy"`` NaN on a
    segmentation photograph, ``"ex_annotated"`` False (and an empty ``"ex_mask"``) on a grading one.
    ``"test"`` is the official grading test part with ``task="dme"`` alone (the samples of
    :class:`IDRiDGrading`), on which the DME risk is scored; the exudate maps are scored on the
    segmentation test part (its own data spec, ``idrid:dataset=segmentation,union=EX``).

    Each train/val sample: ``{"image", "label" (DME risk 0-2 or -1), "fov", "spacing" (DD per pixel),
    "ex_mask": bool (1, H, W) hard exudates within the FOV, "ex_annotated": bool, "fovea_xy": float32
    (2,) or NaN, "dd_px", "index", "patient_id", "image_id"}``.

    Args:
        root: the folder that holds ``idrid/``, or ``None`` for ``$MLMI_ZOO_DATA``.
        split: ``"train"`` (44 + 330), ``"val"`` (10 + 83) or ``"test"`` (103 graded photographs).
        size: long side of the returned images in pixels.
        prepare: build the missing cache entries now.
        transform: optional callable applied to each sample dict.

    Attributes:
        parts: the data sets, in case order; label_names (the DME risks); image_ids (prefixed with
            their set, ``"segmentation/IDRiD_01"``); official_part; size; shape; folder; set_name
            (``"macula"``); spacing_unit (``"DD"``).
    """

    set_name = "macula"
    label_names = GRADING_TASKS["dme"]
    spacing_unit = "DD"
    KEYS = ("image", "label", "fov", "spacing", "ex_mask", "ex_annotated", "fovea_xy", "dd_px", "index",
            "patient_id", "image_id")

    def __init__(self, root: str | os.PathLike[str] | None = None, split: str = "train", size: int = DEFAULT_SIZE,
                 prepare: bool = True, transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.split = split
        self.official_part = _check_split(split)
        self.transform = transform
        grading = IDRiDGrading(root, split, size, prepare, task="dme")
        parts: list[IDRiDGrading | IDRiDSegmentation] = [grading]
        if split != "test":
            parts.insert(0, IDRiDSegmentation(root, split, size, prepare=prepare))
        self.parts = tuple(parts)
        self.size, self.shape, self.folder = grading.size, grading.shape, grading.folder
        self.image_ids = tuple(f"{p.set_name}/{i}" for p in self.parts for i in p.image_ids)
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def _locate(self, index: int) -> tuple[IDRiDGrading | IDRiDSegmentation, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cases")
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.parts[k], index - int(self._offsets[k])

    def label_of(self, index: int) -> int:
        """The DME risk of case ``index`` (-1 for a segmentation photograph), without reading the image."""
        part, i = self._locate(index)
        return part.label_of(i) if isinstance(part, IDRiDGrading) else -1

    def fovea_positions(self) -> np.ndarray:
        """(N, 2) the fovea ``(x, y)`` of every case in returned pixels (NaN for segmentation photographs)."""
        return np.concatenate([p.fovea_positions() if isinstance(p, IDRiDGrading) else np.full((len(p), 2), np.nan)
                               for p in self.parts])

    def files_read(self, image_ids: Sequence[str] | None = None) -> list[Path]:
        """The source files of this split (or of the given prefixed ``image_ids``)."""
        keep = set(self.image_ids if image_ids is None else image_ids)
        return [f for p in self.parts
                for f in p.files_read([i for i in p.image_ids if f"{p.set_name}/{i}" in keep])]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        part, i = self._locate(index)
        sample = part[i]
        if self.split == "test":
            out = dict(sample)
        else:
            ex = LESIONS.index("EX")
            if isinstance(part, IDRiDSegmentation):
                annotated = bool(sample["annotated"][ex])
                ex_mask = sample["mask"][ex:ex + 1] & annotated
                fovea = torch.full((2,), math.nan)
            else:
                annotated, ex_mask, fovea = False, torch.zeros(1, *self.shape, dtype=torch.bool), sample["fovea_xy"]
            out = {"image": sample["image"], "label": sample["label"], "fov": sample["fov"], "spacing": sample["spacing"],
                   "ex_mask": ex_mask, "ex_annotated": torch.tensor(annotated), "fovea_xy": fovea,
                   "dd_px": sample["dd_px"], "image_id": f"{part.set_name}/{sample['image_id']}",
                   "patient_id": sample["patient_id"]}
        out["index"] = int(index)
        return self.transform(out) if self.transform is not None else out

    def __repr__(self) -> str:
        return f"IDRiDMacula(split={self.split!r}, size={self.size}, n={len(self)}, shape={self.shape})"

"""IDRiD's joined sets: the segmentation photographs (lesion masks, no grade) and the grading photographs
(grades, fovea, no mask) in one data set, for models that learn from both.

* :class:`IDRiDMacula` (``idrid:dataset=macula``): what a macular-edema model learns from;
* :class:`IDRiDLesions` (``idrid:dataset=lesions``): what a lesion-concept model of the DR grade learns
  from (the four lesion types as concepts with their masks, and the DR grade or referable DR).

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
from mlmi_zoo.training.datasets.idrid import (DEFAULT_SIZE, GRADING_TASKS, LESION_NAMES, LESIONS, IDRiDGrading,
                                              IDRiDSegmentation, _check_split)

__all__ = ["IDRiDMacula", "IDRiDLesions", "LESION_CONCEPTS", "AREA_CONCEPTS"]


class _Joined(SizedDataset[dict[str, Any]]):
    """The segmentation photographs of a split (``"train"``, ``"val"``; ``with_segmentation_test`` adds the
    official test part), then its grading photographs, as one data set with one key set."""

    set_name = "joined"
    spacing_unit = "DD"
    label_names: tuple[str, ...] = ()

    def __init__(self, root: str | os.PathLike[str] | None, split: str, size: int, prepare: bool,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None, task: str,
                 segmentation: bool) -> None:
        self.split = split
        self.official_part = _check_split(split)
        self.transform = transform
        self.root = root
        grading = IDRiDGrading(root, split, size, prepare, task=task)
        parts: list[IDRiDGrading | IDRiDSegmentation] = [grading]
        if segmentation:
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
        """The label of case ``index`` (-1 for a segmentation photograph), without reading the image."""
        part, i = self._locate(index)
        return part.label_of(i) if isinstance(part, IDRiDGrading) else -1

    def files_read(self, image_ids: Sequence[str] | None = None) -> list[Path]:
        """The source files of this split (or of the given prefixed ``image_ids``)."""
        keep = set(self.image_ids if image_ids is None else image_ids)
        return [f for p in self.parts
                for f in p.files_read([i for i in p.image_ids if f"{p.set_name}/{i}" in keep])]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, size={self.size}, n={len(self)}, shape={self.shape})"


class IDRiDMacula(_Joined):
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
    KEYS = ("image", "label", "fov", "spacing", "ex_mask", "ex_annotated", "fovea_xy", "dd_px", "index",
            "patient_id", "image_id")

    def __init__(self, root: str | os.PathLike[str] | None = None, split: str = "train", size: int = DEFAULT_SIZE,
                 prepare: bool = True, transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        super().__init__(root, split, size, prepare, transform, "dme", segmentation=split != "test")

    def fovea_positions(self) -> np.ndarray:
        """(N, 2) the fovea ``(x, y)`` of every case in returned pixels (NaN for segmentation photographs)."""
        return np.concatenate([p.fovea_positions() if isinstance(p, IDRiDGrading) else np.full((len(p), 2), np.nan)
                               for p in self.parts])

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


LESION_CONCEPTS = tuple(LESION_NAMES[c].replace(" ", "_") for c in LESIONS[:-1])  # the segmentation set's concept names
AREA_CONCEPTS = tuple(f"{c.lower()}_area_dd2" for c in LESIONS[:-1])
PARTS = ("both", "grading", "segmentation")


class IDRiDLesions(_Joined):
    """What a lesion-concept model of diabetic retinopathy learns from: lesion masks from one set, grades from the other.

    The concepts are the four lesion types the specialists outlined (microaneurysms, haemorrhages, hard and
    soft exudates): each one's presence and its area in DD^2, with its mask. Only the segmentation
    photographs carry them, and only the grading photographs carry a grade, so ``"both"`` (the default of
    ``"train"`` and ``"val"``) holds both sets' photographs of the split, every sample with the same keys;
    what a photograph lacks is marked missing: ``"label"`` -1 on a segmentation photograph, concepts and
    areas NaN and ``"concept_masks_known"`` False on a grading one, soft exudates NaN where the
    specialists did not outline them (absent is 0). ``"test"`` defaults to the official grading test part
    (the task is scored there); ``part="segmentation"`` gives a split's segmentation photographs alone, on
    which the concept maps are scored against the masks.

    Each sample: ``{"image", "label" (the task's, or -1), "fov", "spacing" (DD per pixel), "concepts":
    {lesion: 1.0 / 0.0 / NaN}, "measurements": {"<code>_area_dd2": DD^2 or NaN}, "concept_masks": {lesion:
    bool (1, H, W) within the FOV}, "concept_masks_known": {lesion: bool}, "dd_px", "index", "patient_id",
    "image_id"}``, with the lesion names of :data:`LESION_CONCEPTS` and the area names of
    :data:`AREA_CONCEPTS`.

    Args:
        root: the folder that holds ``idrid/``, or ``None`` for ``$MLMI_ZOO_DATA``.
        split: ``"train"`` (44 + 330), ``"val"`` (10 + 83) or ``"test"`` (103 graded, or 27 segmentation photographs).
        size: long side of the returned images in pixels.
        prepare: build the missing cache entries now.
        transform: optional callable applied to each sample dict.
        task: the grading photographs' label: ``"referable"`` (grade >= 2) or ``"grade"`` (ICDR 0-4).
        part: ``"both"``, ``"grading"`` or ``"segmentation"``; default ``"both"`` for train/val, ``"grading"`` for test.

    Attributes:
        parts, label_names, image_ids (prefixed with their set), official_part, size, shape, folder,
        set_name (``"lesions"``), spacing_unit (``"DD"``), part, task, control_appearance (per lesion,
        ``"bright"`` or ``"dark"``: the image-processing control that needs no learning).
    """

    set_name = "lesions"
    # how each lesion type looks on the green channel of a fundus photograph, where lesions have the most
    # contrast: exudates are bright, microaneurysms and haemorrhages dark
    control_appearance = IDRiDGrading.control_appearance

    def __init__(self, root: str | os.PathLike[str] | None = None, split: str = "train", size: int = DEFAULT_SIZE,
                 prepare: bool = True, transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 task: str = "referable", part: str | None = None) -> None:
        if task not in ("referable", "grade"):
            raise ValueError(f"task must be 'referable' or 'grade' (a lesion-concept model of DR), got {task!r}")
        part = part if part is not None else ("grading" if split == "test" else "both")
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.task, self.part = task, part
        self.label_names = GRADING_TASKS[task]
        super().__init__(root, split, size, prepare, transform, task, segmentation=part != "grading")
        if part == "segmentation":  # the grading part was only read for its grid; keep the masks' photographs
            self.parts = self.parts[:1]
            self.image_ids = tuple(f"{p.set_name}/{i}" for p in self.parts for i in p.image_ids)
            self._offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def concept_mask_set(self, split: str) -> "IDRiDLesions":
        """The segmentation photographs of ``split`` (same root, size and task): every lesion concept's mask and area.

        The evaluation scores a lesion-concept model's maps on ``concept_mask_set("test")``, the 27 official
        segmentation test photographs, as the grading photographs it is graded on have no masks.
        """
        return IDRiDLesions(self.root, split, self.size, True, self.transform, self.task, "segmentation")

    def __getitem__(self, index: int) -> dict[str, Any]:
        part, i = self._locate(index)
        sample = part[i]
        nan = torch.tensor(math.nan)
        if isinstance(part, IDRiDSegmentation):
            annotated = sample["annotated"]
            masks = {name: sample["mask"][k:k + 1] & sample["fov"] for k, name in enumerate(LESION_CONCEPTS)}
            known = {name: annotated[k].clone() for k, name in enumerate(LESION_CONCEPTS)}
            concepts = {name: sample["concepts"][name] for name in LESION_CONCEPTS}
            areas = {name: sample["measurements"][name] for name in AREA_CONCEPTS}
        else:
            empty = torch.zeros(1, *self.shape, dtype=torch.bool)
            masks = {name: empty for name in LESION_CONCEPTS}
            known = {name: torch.tensor(False) for name in LESION_CONCEPTS}
            concepts = {name: nan for name in LESION_CONCEPTS}
            areas = {name: nan for name in AREA_CONCEPTS}
        out = {"image": sample["image"], "label": sample["label"], "fov": sample["fov"], "spacing": sample["spacing"],
               "concepts": concepts, "measurements": areas, "concept_masks": masks, "concept_masks_known": known,
               "dd_px": sample["dd_px"], "image_id": f"{part.set_name}/{sample['image_id']}",
               "patient_id": sample["patient_id"], "index": int(index)}
        return self.transform(out) if self.transform is not None else out

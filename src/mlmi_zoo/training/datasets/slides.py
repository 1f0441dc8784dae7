"""Whole-slide images as bags of cached tile features with slide-level labels, for attention MIL.

The pipeline follows the common practice of weakly supervised computational pathology (CLAM,
Lu et al., Nature Biomedical Engineering 2021; Ilse et al. 2018 for the MIL model): cut the tissue
into non-overlapping tiles and drop background (:func:`~.tiling.tile_slide`, reading regions through
:mod:`.slide_regions`), encode each tile once with a frozen encoder and cache the features per slide
(:mod:`.feature_cache`), and train on bags of cached features — the data set of this module. What we
changed: ``tifffile`` instead of OpenSlide, a plain saturation threshold for tissue, one
``safetensors`` file per slide (see those modules); labels come from a mapping or a CSV and may be
class names or indices.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mlmi_zoo.training.data_spec import SizedDataset
from mlmi_zoo.training.datasets.feature_cache import CACHE_SUFFIX, load_cached_features, slide_id_of

__all__ = ["CachedBagDataset"]

logger = logging.getLogger(__name__)


class CachedBagDataset(SizedDataset[dict[str, Any]]):
    """Bags of cached tile features with slide-level labels, for attention MIL.

    Each item: ``{"feats": float32 (N, D), "coords": int64 (N, 2), "label": int64 scalar,
    "index": int, "slide_id": str}``.

    Args:
        dir_or_files: a folder of ``*.safetensors`` caches, or a list of cache files.
        labels: ``{slide_id: label}`` or a CSV path with columns ``slide_id`` and ``label``; labels are
            class indices or class names.
        label_names: class names in index order; default: ``"0".."K-1"`` for integer labels, sorted
            names for string labels.

    Raises:
        ValueError: no caches found, or caches without a label (all listed in one message), or labels
            not in ``label_names``.
    """

    def __init__(
        self,
        dir_or_files: str | Path | Sequence[str | Path],
        labels: Mapping[str, int | str] | str | Path,
        label_names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(dir_or_files, (str, Path)):
            folder = Path(dir_or_files)
            if not folder.is_dir():
                raise FileNotFoundError(f"feature cache folder not found: {str(folder)!r}")
            files = sorted(folder.glob(f"*{CACHE_SUFFIX}"))
        else:
            files = [Path(f) for f in dir_or_files]
        if not files:
            raise ValueError(f"no {CACHE_SUFFIX} feature caches in {dir_or_files!r}")
        label_map = _read_label_csv(Path(labels)) if isinstance(labels, (str, Path)) else dict(labels)
        self.files = files
        self.slide_ids = [slide_id_of(f) for f in files]
        unlabeled = [s for s in self.slide_ids if s not in label_map]
        if unlabeled:
            raise ValueError(f"{len(unlabeled)} feature caches have no label: {unlabeled[:20]}; add them to the labels")
        values = [label_map[s] for s in self.slide_ids]
        self.label_names, self.labels = _encode_labels(values, label_names)
        extra = sorted(set(label_map) - set(self.slide_ids))
        if extra:
            logger.warning("%d labelled slides have no feature cache, e.g. %s", len(extra), extra[:5])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cached = load_cached_features(self.files[index])
        return {
            "feats": cached.feats.float(),  # (N, D)
            "coords": cached.coords.long(),  # (N, 2)
            "label": torch.tensor(self.labels[index], dtype=torch.int64),
            "index": int(index),
            "slide_id": self.slide_ids[index],
        }


def _read_label_csv(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"label CSV not found: {str(path)!r}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"slide_id", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns 'slide_id' and 'label', got {reader.fieldnames}")
        return {row["slide_id"].strip(): row["label"].strip() for row in reader}


def _encode_labels(values: Sequence[int | str], label_names: Sequence[str] | None) -> tuple[tuple[str, ...], list[int]]:
    """Map labels given as indices or names to indices; return (label_names, indices)."""
    as_int = [int(v) if isinstance(v, (int, np.integer)) or str(v).lstrip("-").isdigit() else None for v in values]
    if label_names is not None:
        names = tuple(label_names)
        out, bad = [], []
        for v, i in zip(values, as_int):
            if str(v) in names:
                out.append(names.index(str(v)))
            elif i is not None and 0 <= i < len(names):
                out.append(i)
            else:
                bad.append(v)
        if bad:
            raise ValueError(f"labels {sorted(set(map(str, bad)))} are not in label_names {names}")
        return names, out
    ints = [i for i in as_int if i is not None]
    if len(ints) == len(as_int):  # every label is an index
        if min(ints) < 0:
            raise ValueError(f"integer labels must be >= 0, got {min(ints)}")
        return tuple(str(k) for k in range(max(ints) + 1)), [int(i) for i in ints]
    names = tuple(sorted({str(v) for v in values}))
    return names, [names.index(str(v)) for v in values]

"""Checks of a user's data against a base model, before the first epoch of fine-tuning.

Each returns every problem with its fix, naming the row of the user's CSV where it has one, so that a
run is refused at once instead of failing in its first epoch: the image and mask files open
(:func:`_unreadable_problems`); channels, dimensions, one size and the intensity range against the base
model's transform (:func:`check_images`, which can also re-fit the window); classes in the training
split (:func:`_label_problems`); the spacing and measurements a physical head needs
(:func:`_physical_problems`). :mod:`mlmi_zoo.training.finetune` gathers them and raises
:class:`~mlmi_zoo.training.finetune_data.FinetuneDataError`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.training.data_spec import IndexSubset
from mlmi_zoo.training.finetune_data import (_MIN_SPREAD, _PIXELS_PER_IMAGE, _REFIT_PERCENTILES, SAMPLED_CASES,
                                             IntensityMode, _sample_indices)

__all__ = ["check_images"]

log = logging.getLogger(__name__)


def _where(dataset: Any, index: int) -> str:
    """A case's place in the user's file: ``row N`` of the CSV when known, else its index."""
    base, i = dataset, index
    while isinstance(base, IndexSubset):
        base, i = base.dataset, int(base.indices[i])
    row_number = getattr(base, "row_number", None)
    csv_path = getattr(base, "csv_path", None)
    if callable(row_number) and csv_path is not None:
        return f"row {row_number(i)} of {Path(csv_path).name}"
    return f"case {index}"


def _csv_rows(dataset: Any) -> tuple[Any, list[int]] | None:
    """The :class:`FolderCSVDataset` under ``dataset`` and the row indices it uses (None for other data)."""
    from mlmi_zoo.training.datasets.folder_csv import FolderCSVDataset

    base: Any = dataset
    indices: list[int] = list(range(len(dataset)))
    while isinstance(base, IndexSubset):
        indices = [int(base.indices[i]) for i in indices]
        base = base.dataset
    return (base, indices) if isinstance(base, FolderCSVDataset) else None


def _describe_transform_fix(unit: str | None) -> str:
    give = f"give images in {unit} (DICOM/NIfTI files keep {unit})" if unit else "give images in the base model's range"
    return (f"{give}, or pass intensity=refit (--intensity refit; intensity='refit' in Python) to re-fit the window "
            "to your training images (recorded in the model's config.json), or intensity=keep to train on them as "
            "they are")


def check_images(model: InterpretableModel, dataset: Any, intensity: IntensityMode = "check",
                 max_cases: int = SAMPLED_CASES) -> tuple[list[str], dict[str, Any] | None]:
    """Check that images fit ``model``: channels, spatial dimensions, one size, intensity range.

    Reads ``max_cases`` cases evenly spread over ``dataset``.

    Args:
        model: the model the images are for (its input spec and intensity transform).
        dataset: the cases (sample dicts with ``"image"``).
        intensity: ``"check"`` the range against the model's intensity transform; ``"refit"`` fit a
            window to the images (0.5th-99.5th percentiles) instead; ``"keep"`` leave it unchecked.
        max_cases: how many cases to read.

    Returns:
        ``(problems, fitted)``: each problem says what is wrong and how to fix it; ``fitted`` is the
        re-fitted transform as a config dict (with ``"refit"``), else None.
    """
    spec = model.input_spec
    problems: list[str] = []
    indices = _sample_indices(len(dataset), max_cases)
    images = [(i, torch.as_tensor(dataset[i]["image"]).float()) for i in indices]
    if not images:
        return ["the data hold no case"], None
    channels = sorted({int(img.shape[0]) for _, img in images})
    dims = sorted({img.ndim - 1 for _, img in images})
    if dims != [spec.spatial_dims]:
        problems.append(f"the base model takes {spec.spatial_dims}D images; these are {dims[-1]}D "
                        f"(shape {tuple(images[0][1].shape)}, {_where(dataset, images[0][0])}); choose a "
                        f"{dims[-1]}D base model")
        return problems, None
    if channels != [spec.in_channels]:
        convert = "greyscale" if spec.in_channels == 1 else "RGB"
        problems.append(f"the base model takes {spec.in_channels}-channel images; these have {channels} channel(s) "
                        f"(e.g. {_where(dataset, images[0][0])}); pass data.params.channels={spec.in_channels} to read "
                        f"PNG/JPEG files as {convert}, or save them so")
    sizes: dict[tuple[int, ...], int] = {}
    for i, img in images:
        sizes.setdefault(tuple(img.shape[1:]), i)
    if len(sizes) > 1:
        shown = ", ".join(f"{s} ({_where(dataset, i)})" for s, i in list(sizes.items())[:4])
        trained = f" (the base model was trained at {tuple(spec.size)})" if spec.size else ""
        problems.append(f"images differ in size: {shown}; a batch needs one size: resize them to one size{trained}")
    elif spec.size and next(iter(sizes)) != tuple(spec.size) and intensity != "refit":  # refit: checked again after
        log.warning("images are %s; the base model was trained at %s (it is convolutional: this works, but "
                    "features of another scale may transfer less well)", next(iter(sizes)), tuple(spec.size))
    if problems or intensity == "keep":
        return problems, None
    base = dataclasses.replace(spec.intensity, mean=None, std=None)  # the [0, 1] stage, before any normalisation
    # A strided share of each image's pixels: percentiles of 32 volumes need not hold them all in memory.
    pixels = np.concatenate([img.reshape(-1)[::max(1, img.numel() // _PIXELS_PER_IMAGE)].numpy() for _, img in images])
    lo, hi = float(pixels.min()), float(pixels.max())
    read_note = " (PNG/JPEG/TIFF files are read scaled to [0, 1])" if 0.0 <= lo and hi <= 1.0 else ""
    if intensity == "refit":
        p_lo, p_hi = (float(v) for v in np.percentile(pixels, _REFIT_PERCENTILES))
        if not p_hi > p_lo:
            return [f"the training images are constant ({p_lo:.4g}) over their 0.5th-99.5th percentiles; "
                    "there is no intensity window to fit"], None
        fitted = {"kind": "window", "low": p_lo, "high": p_hi, "unit": None,
                  "mean": list(spec.intensity.mean) if spec.intensity.mean is not None else None,
                  "std": list(spec.intensity.std) if spec.intensity.std is not None else None}
        return [], fitted
    mapped = [base(img) for _, img in images]
    spread = float(np.median([float(m.std()) for m in mapped]))
    m_lo, m_hi = min(float(m.min()) for m in mapped), max(float(m.max()) for m in mapped)
    outside = float(np.mean([float(((m < -0.5) | (m > 1.5)).float().mean()) for m in mapped]))
    what = f"your images span [{lo:.4g}, {hi:.4g}]{read_note}"
    expects = (f"raw values in {spec.intensity.unit} ({spec.intensity.describe()})" if spec.intensity.unit
               else f"values its transform maps to [0, 1] ({spec.intensity.describe()})")
    if spread < _MIN_SPREAD:
        problems.append(f"{what}; the base model expects {expects}, which maps them to [{m_lo:.4g}, {m_hi:.4g}] "
                        f"(median std {spread:.2g}): a near-constant image the model cannot learn from. Fix: "
                        f"{_describe_transform_fix(spec.intensity.unit)}")
    elif outside > 0.01:
        problems.append(f"{what}; the base model expects {expects}, which maps {outside:.0%} of their pixels far "
                        f"outside [0, 1] (to [{m_lo:.4g}, {m_hi:.4g}]). Fix: {_describe_transform_fix(spec.intensity.unit)}")
    return problems, None


def _label_problems(train_set: Any, label_names: Sequence[str], val_fraction: float) -> list[str]:
    if len(label_names) < 2:
        return [f"a classifier needs at least two classes; the data hold {list(label_names)}"]
    rows = _csv_rows(train_set)
    if rows is None:
        return []  # labels of other data sets are their loader's business; reading every image here would be slow
    base, indices = rows
    labels = base.labels
    counts = np.bincount([labels[i] for i in indices], minlength=len(label_names))
    empty = [name for name, n in zip(label_names, counts) if n == 0]
    if not empty:
        return []
    return [f"class(es) {empty} have no case in the training split ({len(indices)} cases, val_fraction="
            f"{val_fraction}): add cases, lower the validation share (--val-fraction), or leave them out of the "
            "label names (--labels)"]


def _unreadable_problems(train_set: Any) -> list[str]:
    """The damaged image and mask files of a CSV's every row (training and validation cases), by row and column;
    checked before anything is decoded, so a run does not stop at the first one in its first epoch."""
    rows = _csv_rows(train_set)
    if rows is None:
        return []
    bad = rows[0].unreadable()
    if not bad:
        return []
    shown = "; ".join(bad[:8]) + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")
    return [f"{len(bad)} file(s) cannot be read: {shown}; replace them, or remove their rows (or files)"]


def _physical_problems(model: InterpretableModel, train_set: Any, samples: list[dict[str, Any]]) -> list[str]:
    quantities = [q.name for q in model.config.quantities]
    if not quantities:
        return []
    rows = _csv_rows(train_set)
    if rows is not None:
        base, indices = rows
        missing = base.rows_without_spacing(indices)
        problems = []
        if missing:
            shown = ", ".join(str(r) for r in missing[:8]) + (" ..." if len(missing) > 8 else "")
            problems.append(f"the base model measures {quantities} and needs every training image's spacing; "
                            f"{len(missing)} row(s) of {base.csv_path.name} have none (blank "
                            f"{'/'.join(base.spacing_columns) or 'spacing'} and a PNG/JPEG/TIFF): rows {shown}")
        for name in quantities:
            if name in base.measurement_columns and not base.has_values(name, indices):
                problems.append(f"column {name!r} is blank in every training row; the base model's physical head "
                                "needs measured values (blank = unknown for some rows is fine)")
        return problems
    if any(s.get("spacing") is None for s in samples):
        return [f"the base model measures {quantities} and needs samples with a 'spacing' (mm); this data set has "
                "none"]
    return []

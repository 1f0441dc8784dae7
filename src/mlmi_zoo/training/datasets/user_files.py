"""The conventions of a user's files: which suffixes are images, what a CSV's column names mean (units
as suffixes, spacing columns), a folder of class sub-folders listed into a CSV, and one image file
read into a tensor. :class:`~mlmi_zoo.training.datasets.folder_csv.FolderCSVDataset` reads the data
by them; fine-tuning reads a CSV's header by them before it builds anything.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mlmi_zoo.units import parse_unit

__all__ = ["UNIT_SUFFIXES", "IMAGE_SUFFIXES", "unit_from_column", "has_unit_suffix", "read_csv_header",
           "spacing_columns_in", "list_image_folder", "write_image_folder_csv", "read_image"]

_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_MEDICAL_SUFFIXES = (".dcm", ".dicom", ".ima", ".nii", ".nii.gz")
IMAGE_SUFFIXES = _PIL_SUFFIXES + _MEDICAL_SUFFIXES

# Column-name suffix -> pint unit. Explicit on purpose: pint parses many short words ("are", "a")
# as units, so guessing from any suffix would turn ordinary column names into units.
UNIT_SUFFIXES: dict[str, str] = {
    "um": "um", "mm": "mm", "cm": "cm", "m": "m",
    "um2": "um^2", "mm2": "mm^2", "cm2": "cm^2",
    "um3": "um^3", "mm3": "mm^3", "cm3": "cm^3", "cc": "cc",
    "ml": "mL", "l": "L",
    "hu": "HU",
    "pct": "percent", "percent": "percent",
    "s": "s", "ms": "ms",
    "g": "g", "mg": "mg", "kg": "kg",
    "deg": "degree",
}


def unit_from_column(name: str) -> str:
    """Return the pint unit named by a column's suffix: ``"area_mm2"`` -> ``"mm^2"``.

    Args:
        name: a column name ``<quantity>_<unit>``.

    Returns:
        the pint unit string.

    Raises:
        ValueError: the suffix is not one of :data:`UNIT_SUFFIXES`.
    """
    suffix = name.rsplit("_", 1)[-1].lower() if "_" in name else ""
    if suffix not in UNIT_SUFFIXES:
        raise ValueError(
            f"column {name!r}: unknown unit suffix {suffix!r}; name measurement columns <quantity>_<unit> with unit "
            f"one of {sorted(UNIT_SUFFIXES)} (e.g. diameter_mm, area_mm2, volume_ml, mean_hu)"
        )
    unit = UNIT_SUFFIXES[suffix]
    parse_unit(unit)
    return unit


def has_unit_suffix(name: str) -> bool:
    """Whether ``name`` ends in ``_<unit>`` with a unit of :data:`UNIT_SUFFIXES` (a measurement column)."""
    return "_" in name and name.rsplit("_", 1)[-1].lower() in UNIT_SUFFIXES


def read_csv_header(csv_path: str | Path) -> tuple[str, ...]:
    """The column names of a CSV's first row (stripped).

    Args:
        csv_path: the CSV file.

    Returns:
        the names, in file order; ``()`` for an empty file.

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV not found: {str(path)!r}")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        first = next(csv.reader(fh), [])
    return tuple(h.strip() for h in first)


def spacing_columns_in(header: Sequence[str]) -> tuple[str, ...]:
    """The spacing column(s) of a header: one ``spacing_<unit>``, else ``spacing_{z,y,x}_<unit>`` in axis order.

    Args:
        header: the CSV's column names.

    Returns:
        ``("spacing_mm",)``, ``("spacing_y_mm", "spacing_x_mm")`` (z first when present), or ``()``.

    Raises:
        ValueError: several single spacing columns (``spacing_mm`` and ``spacing_cm``), or both forms.
    """
    single = [h for h in header if re.fullmatch(r"spacing_[A-Za-z0-9]+", h) and has_unit_suffix(h)]
    per_axis = {m.group(1).lower(): h for h in header
                if (m := re.fullmatch(r"spacing_([zyxZYX])_[A-Za-z0-9]+", h)) and has_unit_suffix(h)}
    if len(single) > 1 or (single and per_axis):
        raise ValueError(f"row 1: several spacing columns {single + sorted(per_axis.values())}; keep one "
                         "('spacing_mm' holding '0.7x0.7', or one 'spacing_<axis>_mm' column per axis)")
    if single:
        return (single[0],)
    return tuple(per_axis[a] for a in "zyx" if a in per_axis)


def list_image_folder(root: str | Path) -> list[tuple[str, str]]:
    """The images of a ``ROOT/<class>/<image>`` folder (torchvision's ImageFolder layout), with their class.

    Files are found recursively under each class folder, in sorted order; hidden files and folders
    (``.name``) are skipped; a DICOM series is one folder of ``.dcm`` files and is not supported here
    (list DICOM series in a CSV).

    Args:
        root: the folder holding one sub-folder per class.

    Returns:
        ``[(path relative to root, class name), ...]`` sorted by path.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no class sub-folder, or a class folder without a single image.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {str(root)!r}")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} holds neither a .csv file nor class sub-folders; expected a CSV describing the "
                         f"images, or one folder per class ({root}/<class>/<image>.png)")
    rows: list[tuple[str, str]] = []
    empty: list[str] = []
    for folder in classes:
        found = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not found:
            empty.append(folder.name)
        rows.extend((p.relative_to(root).as_posix(), folder.name) for p in found)
    if empty:
        raise ValueError(f"{root}: class folder(s) {empty} hold no image ({', '.join(IMAGE_SUFFIXES)}); "
                         "add images or remove the folder")
    return rows


def write_image_folder_csv(root: str | Path, csv_path: str | Path) -> Path:
    """List a ``ROOT/<class>/<image>`` folder into a CSV (``image,label``) that :class:`FolderCSVDataset` reads.

    Image paths are relative to ``root`` (pass ``image_dir=root`` to the data set). The CSV is the
    record of which files were used with which class: its sha256 identifies the listing.

    Args:
        root: the folder holding one sub-folder per class.
        csv_path: the CSV to write (atomically; its folder is created).

    Returns:
        ``csv_path``.

    Raises:
        FileNotFoundError, ValueError: see :func:`list_image_folder`.
    """
    from mlmi_zoo._weights import write_text_atomic

    rows = list_image_folder(root)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "label"])
    writer.writerows(rows)
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, buffer.getvalue())
    return path


def read_image(path: Path, channels: int | None) -> tuple[torch.Tensor, tuple[float, ...] | None]:
    """Read one image as float32 ``(C, *spatial)`` plus its spacing in mm when the format stores one."""
    if path.is_file() and path.name.lower().endswith(_PIL_SUFFIXES):
        from PIL import Image

        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I") and channels != 3:
                arr = np.asarray(im, dtype=np.float32) / 65535.0  # 16-bit grey
                arr = arr[None]
            else:
                grey = channels == 1 or (channels is None and im.mode in ("L", "1", "LA"))
                im = im.convert("L") if grey else im.convert("RGB")
                arr = np.asarray(im, dtype=np.float32) / 255.0
                arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)  # (H, W, 3) -> (3, H, W)
        return torch.from_numpy(np.ascontiguousarray(arr)), None
    from mlmi_zoo.training.datasets.medical_io import load_image

    loaded = load_image(path)
    if channels is not None and loaded.array.shape[0] != channels:
        raise ValueError(f"{path}: {loaded.array.shape[0]} channel(s), but channels={channels} was asked; "
                         "DICOM/NIfTI images are read as stored")
    return torch.from_numpy(loaded.array), loaded.spacing

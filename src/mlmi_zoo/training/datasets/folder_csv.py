"""Users' own images described by a CSV: labels, concepts, physical measurements and spacing.

This is the loader for private hospital data that never leaves the user's machine. One CSV row per
image; the whole CSV is validated when the data set is built and *every* bad row is reported in one
error (row numbers as a spreadsheet shows them: the header is row 1), so a user fixes the file once
instead of discovering problems one epoch at a time. Nothing is skipped silently.

CSV columns:
    * ``image`` (``image_column``): path relative to ``image_dir`` (default: the CSV's folder) of a
      PNG/JPEG/TIFF (read with PIL, scaled to [0, 1], no spacing unless given), a DICOM file or series
      folder, or a NIfTI file (read with :func:`~mlmi_zoo.training.datasets.medical_io.load_image`,
      raw intensities such as HU, spacing from the header).
    * ``label`` (``label_column``): class name or class index.
    * concept columns: numbers; blank = missing (NaN, masked in concept losses).
    * measurement columns: numbers whose unit is the suffix of the column name, parsed by pint:
      ``diameter_mm`` (mm), ``area_mm2`` (mm²), ``volume_ml`` (mL), ``mean_hu`` (HU), ``length_cm``;
      blank = missing (NaN).
    * spacing: one column such as ``spacing_mm`` holding ``"0.7x0.7"`` (one value per spatial axis),
      or one column per axis (``spacing_y_mm``, ``spacing_x_mm``); converted to mm with pint. When
      given, it overrides the spacing of a DICOM/NIfTI header.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mlmi_zoo.specs import QuantitySpec
from mlmi_zoo.training.data_spec import SizedDataset
from mlmi_zoo.units import convert, parse_unit

logger = logging.getLogger(__name__)

_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_MEDICAL_SUFFIXES = (".dcm", ".dicom", ".ima", ".nii", ".nii.gz")

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


@dataclass(frozen=True)
class _Row:
    image: Path
    label: int
    concepts: dict[str, float]
    measurements: dict[str, float]
    spacing: tuple[float, ...] | None


class FolderCSVDataset(SizedDataset[dict[str, Any]]):
    """Images listed in a CSV with labels, concepts, measurements and spacing.

    Each sample: ``{"image": float32 (C, H, W) or (C, D, H, W), "label": int64 scalar,
    "concepts": {name: float32 scalar, NaN = missing}, "measurements": {name: float32 scalar in the
    column's unit}, "index": int}`` plus ``"spacing"`` (float32 ``(spatial_dims,)`` mm) when known.

    Args:
        csv_path: the CSV file.
        image_dir: folder image paths are relative to; default: the CSV's folder.
        label_column: column with the class (name or index).
        label_names: class names in index order; default: ``"0".."K-1"`` for integer labels, else the
            sorted distinct names.
        concept_columns: numeric concept columns (blank = missing).
        measurement_columns: numeric columns with a unit suffix (``diameter_mm``, ``volume_ml``...).
        spacing_columns: one column with ``"AxB[xC]"`` values, or one column per spatial axis; the unit
            comes from the name suffix (``spacing_mm``) and must be a length.
        image_column: column with the image path.
        transform: optional callable applied to each sample dict.

    Attributes:
        label_names, measurement_units ({column: pint unit}), quantities (``QuantitySpec`` per
        measurement), csv_sha256.

    Raises:
        FileNotFoundError: the CSV or ``image_dir`` does not exist.
        ValueError: one error listing every bad row ("row N: reason"; header = row 1).
    """

    def __init__(
        self,
        csv_path: str | Path,
        image_dir: str | Path | None = None,
        label_column: str = "label",
        label_names: Sequence[str] | None = None,
        concept_columns: Sequence[str] | None = None,
        spacing_columns: str | Sequence[str] | None = None,
        image_column: str = "image",
        measurement_columns: Sequence[str] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.csv_path = Path(csv_path)
        if not self.csv_path.is_file():
            raise FileNotFoundError(f"CSV not found: {str(self.csv_path)!r}")
        self.image_dir = Path(image_dir) if image_dir is not None else self.csv_path.parent
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image_dir not found: {str(self.image_dir)!r}")
        self.label_column = label_column
        self.image_column = image_column
        self.concept_columns = tuple(concept_columns or ())
        self.measurement_columns = tuple(measurement_columns or ())
        self.spacing_columns = (spacing_columns,) if isinstance(spacing_columns, str) else tuple(spacing_columns or ())
        self.transform = transform
        raw = self.csv_path.read_bytes()
        self.csv_sha256 = hashlib.sha256(raw).hexdigest()

        errors: list[str] = []
        rows = list(csv.reader(raw.decode("utf-8-sig").splitlines()))
        if not rows:
            raise ValueError(f"{self.csv_path}: the CSV is empty; expected a header row and one row per image")
        header = [h.strip() for h in rows[0]]
        self.columns = tuple(header)
        spacing_unit = self._check_header(header, errors)
        if any("missing column" in e for e in errors):  # rows cannot be read without their columns
            raise ValueError(self._report(errors))
        col = {name: i for i, name in enumerate(header)}

        parsed: list[tuple[int, dict[str, Any]]] = []
        raw_labels: list[tuple[int, str]] = []
        for row_number, values in enumerate(rows[1:], start=2):
            if not any(v.strip() for v in values):
                continue  # blank line, e.g. a trailing newline in a spreadsheet export
            if len(values) != len(header):
                errors.append(f"row {row_number}: {len(values)} fields, the header has {len(header)}")
                continue
            cell = {name: values[i].strip() for name, i in col.items()}
            row_errors: list[str] = []
            item = {
                "image": self._check_image(cell[image_column], row_errors),
                "concepts": {c: self._number(cell[c], c, row_errors, allow_blank=True) for c in self.concept_columns},
                "measurements": {m: self._number(cell[m], m, row_errors, allow_blank=True) for m in self.measurement_columns},
                "spacing": self._spacing(cell, spacing_unit, row_errors),
            }
            if not cell[label_column]:
                row_errors.append(f"empty label in column {label_column!r}")
            errors.extend(f"row {row_number}: {e}" for e in row_errors)
            parsed.append((row_number, item))
            raw_labels.append((row_number, cell[label_column]))

        self.label_names, labels = self._encode_labels(raw_labels, label_names, errors)
        ndims = {len(item["spacing"]) for _, item in parsed if item["spacing"] is not None}
        if len(ndims) > 1:
            errors.append(f"row 1: spacing has {sorted(ndims)} values in different rows; use one count (2 or 3) per CSV")
        if not parsed and not errors:
            errors.append("row 1: no data rows after the header")
        if errors:
            raise ValueError(self._report(errors))
        self._rows = [
            _Row(item["image"], labels[rn], item["concepts"], item["measurements"], item["spacing"])
            for rn, item in parsed
        ]

    # -- validation helpers ----------------------------------------------------------------------
    def _check_header(self, header: list[str], errors: list[str]) -> str | None:
        """Check the header (row 1); return the unit of the spacing columns (None if absent or bad)."""
        wanted = [self.image_column, self.label_column, *self.concept_columns, *self.measurement_columns, *self.spacing_columns]
        missing = [c for c in wanted if c not in header]
        if missing:
            errors.append(f"row 1: missing column(s) {missing}; the header has {header}")
        duplicates = [c for c, n in Counter(header).items() if n > 1]
        if duplicates:
            errors.append(f"row 1: duplicate column(s) {duplicates}")
        self.measurement_units: dict[str, str] = {}
        for name in self.measurement_columns:
            try:
                self.measurement_units[name] = unit_from_column(name)
            except ValueError as err:
                errors.append(f"row 1: {err}")
        units = []
        for name in self.spacing_columns:
            try:
                unit = unit_from_column(name)
                convert(1.0, unit, "mm")  # must be a length
                units.append(unit)
            except ValueError as err:
                errors.append(f"row 1: spacing column {name!r} must end in a length unit such as _mm ({err})")
        if len(set(units)) > 1:
            errors.append(f"row 1: spacing columns {list(self.spacing_columns)} use different units {units}; use one")
            return None
        return units[0] if units and len(units) == len(self.spacing_columns) else None

    def _check_image(self, value: str, errors: list[str]) -> Path:
        if not value:
            errors.append(f"empty image path in column {self.image_column!r}")
            return Path()
        p = Path(value)
        p = p if p.is_absolute() else self.image_dir / p
        name = p.name.lower()
        if not p.exists():
            errors.append(f"image file not found: {str(p)!r}")
        elif p.is_file() and not name.endswith(_PIL_SUFFIXES + _MEDICAL_SUFFIXES):
            errors.append(
                f"unsupported image type {p.name!r}; expected one of {_PIL_SUFFIXES + _MEDICAL_SUFFIXES} or a DICOM folder"
            )
        return p

    @staticmethod
    def _number(value: str, column: str, errors: list[str], allow_blank: bool) -> float:
        if value == "" and allow_blank:
            return math.nan
        try:
            number = float(value)
        except ValueError:
            errors.append(f"column {column!r}: cannot parse {value!r} as a number")
            return math.nan
        if not math.isfinite(number):
            errors.append(f"column {column!r}: {value!r} is not a finite number (leave the cell blank for missing)")
        return number

    def _spacing(self, cell: dict[str, str], unit: str | None, errors: list[str]) -> tuple[float, ...] | None:
        if not self.spacing_columns:
            return None
        if len(self.spacing_columns) == 1:
            column = self.spacing_columns[0]
            text = cell[column]
            if not text:
                return None  # unknown for this image; a DICOM/NIfTI header may still give it
            pairs = [(part, column) for part in re.split(r"\s*[x×,;]\s*", text)]
        else:
            pairs = [(cell[c], c) for c in self.spacing_columns]
            if not any(value for value, _ in pairs):
                return None
        values = [self._number(value, column, errors, allow_blank=False) for value, column in pairs]
        shown = "x".join(value for value, _ in pairs)
        if len(values) not in (2, 3):
            errors.append(f"spacing {shown!r} must have 2 or 3 values such as '0.7x0.7'")
        if any(v <= 0 for v in values):
            errors.append(f"spacing {shown!r} must be positive")
        if unit is None or any(math.isnan(v) for v in values):
            return None  # the error is already reported
        return tuple(float(convert(v, unit, "mm")) for v in values)

    def _encode_labels(
        self, raw: list[tuple[int, str]], label_names: Sequence[str] | None, errors: list[str]
    ) -> tuple[tuple[str, ...], dict[int, int]]:
        present = [(rn, v) for rn, v in raw if v]
        is_int = [re.fullmatch(r"\d+", v) is not None for _, v in present]
        if label_names is not None:
            names = tuple(label_names)
        elif present and all(is_int):
            names = tuple(str(k) for k in range(max(int(v) for _, v in present) + 1))
        else:
            names = tuple(sorted({v for (_, v), i in zip(present, is_int) if not i}))
            logger.info("%s: label_names taken from the CSV in sorted order: %s", self.csv_path.name, names)
        out: dict[int, int] = {}
        for rn, v in present:
            if v in names:
                out[rn] = names.index(v)
            elif re.fullmatch(r"\d+", v) and int(v) < len(names):
                out[rn] = int(v)
            else:
                errors.append(f"row {rn}: unknown label {v!r}; expected one of {list(names)} or an index below {len(names)}")
        return names, out

    def _report(self, errors: list[str]) -> str:
        def row_of(e: str) -> int:
            m = re.match(r"row (\d+)", e)
            return int(m.group(1)) if m else 0

        lines = sorted(errors, key=row_of)
        return f"{self.csv_path}: {len(lines)} problem(s); fix them and reload:\n  " + "\n  ".join(lines)

    # -- Dataset -----------------------------------------------------------------------------------
    @property
    def quantities(self) -> tuple[QuantitySpec, ...]:
        """One :class:`~mlmi_zoo.specs.QuantitySpec` per measurement column."""
        return tuple(QuantitySpec(name, unit, low=-math.inf) for name, unit in self.measurement_units.items())

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self._rows[index]
        image, spacing = _read_image(row.image)
        if row.spacing is not None:
            if len(row.spacing) != image.ndim - 1:
                raise ValueError(
                    f"{row.image}: the CSV gives {len(row.spacing)} spacing values but the image has "
                    f"{image.ndim - 1} spatial axes (shape {tuple(image.shape)})"
                )
            spacing = row.spacing
        sample: dict[str, Any] = {
            "image": image,
            "label": torch.tensor(row.label, dtype=torch.int64),
            "concepts": {k: torch.tensor(v, dtype=torch.float32) for k, v in row.concepts.items()},
            "measurements": {k: torch.tensor(v, dtype=torch.float32) for k, v in row.measurements.items()},
            "index": int(index),
        }
        if spacing is not None:
            sample["spacing"] = torch.tensor(spacing, dtype=torch.float32)
        return self.transform(sample) if self.transform is not None else sample

    def describe(self) -> dict[str, Any]:
        """JSON-safe description of the data set, without any of its data (for cards and logs)."""
        counts = Counter(r.label for r in self._rows)
        return {
            "csv_name": self.csv_path.name,
            "csv_sha256": self.csv_sha256,
            "num_rows": len(self._rows),
            "label_names": list(self.label_names),
            "label_counts": {name: int(counts.get(i, 0)) for i, name in enumerate(self.label_names)},
            "columns": {
                "image": self.image_column,
                "label": self.label_column,
                "concepts": list(self.concept_columns),
                "measurements": dict(self.measurement_units),
                "spacing": list(self.spacing_columns),
            },
        }


def _read_image(path: Path) -> tuple[torch.Tensor, tuple[float, ...] | None]:
    """Read one image as float32 ``(C, *spatial)`` plus its spacing in mm when the format stores one."""
    if path.is_file() and path.name.lower().endswith(_PIL_SUFFIXES):
        from PIL import Image

        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32) / 65535.0  # 16-bit grey
                arr = arr[None]
            else:
                im = im.convert("L") if im.mode in ("L", "1", "LA") else im.convert("RGB")
                arr = np.asarray(im, dtype=np.float32) / 255.0
                arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)  # (H, W, 3) -> (3, H, W)
        return torch.from_numpy(np.ascontiguousarray(arr)), None
    from mlmi_zoo.training.datasets.medical_io import load_image

    loaded = load_image(path)
    return torch.from_numpy(loaded.array), loaded.spacing

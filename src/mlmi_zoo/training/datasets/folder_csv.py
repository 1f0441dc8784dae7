"""Users' own images described by a CSV (or a folder of class sub-folders): labels, masks, concepts, measurements, spacing.

This is the loader for private hospital data that never leaves the user's machine. One CSV row per
image; the whole CSV is validated when the data set is built and *every* bad row is reported in one
error (row numbers as a spreadsheet shows them: the header is row 1, and each problem names its
column), so a user fixes the file once instead of discovering problems one epoch at a time. Nothing
is skipped silently.

CSV columns:
    * ``image`` (``image_column``): path relative to ``image_dir`` (default: the CSV's folder) of a
      PNG/JPEG/TIFF (read with PIL, scaled to [0, 1], no spacing unless given), a DICOM file or series
      folder, or a NIfTI file (read with :func:`~mlmi_zoo.training.datasets.medical_io.load_image`,
      raw intensities such as HU, spacing from the header).
    * ``label`` (``label_column``): class name or class number. Without ``label_names`` the classes
      are the labels the CSV holds: names in sorted order, or integers in numeric order named by
      their value (labels ``0`` and ``2`` give two classes, ``"0"`` and ``"2"``; a class that no
      row holds is never invented). A name among integers (or an integer among names) is reported
      with its row.
    * ``mask`` (``mask_column``, optional): path of a lesion mask of the image's size (any non-zero
      pixel is lesion); blank = no lesion drawn (an empty mask).
    * ``patient`` (``patient_column``, optional): who the image belongs to. Images of one patient
      stay on one side of a validation split carved from the CSV, and the evaluation's intervals
      resample patients (``"patient_id"`` of each sample); without it every image is its own patient.
    * concept columns: numbers; blank = missing (NaN, masked in concept losses).
    * measurement columns: numbers whose unit is the suffix of the column name, parsed by pint:
      ``diameter_mm`` (mm), ``area_mm2`` (mm²), ``volume_ml`` (mL), ``mean_hu`` (HU), ``length_cm``;
      blank = missing (NaN).
    * spacing: one column such as ``spacing_mm`` holding ``"0.7x0.7"`` (one value per spatial axis),
      or one column per axis (``spacing_y_mm``, ``spacing_x_mm``); converted to mm with pint. When
      given, it overrides the spacing of a DICOM/NIfTI header.

A folder laid out as ``ROOT/<class>/<image>`` (torchvision's ``ImageFolder`` layout) is listed into
such a CSV by :func:`write_image_folder_csv` (columns ``image,label``; paths relative to ``ROOT``),
so both layouts are read, validated and described by the one loader.
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

import torch

from mlmi_zoo.specs import QuantitySpec
from mlmi_zoo.training.data_spec import SizedDataset
from mlmi_zoo.training.datasets.user_files import (_PIL_SUFFIXES, IMAGE_SUFFIXES, UNIT_SUFFIXES,
                                                  has_unit_suffix, list_image_folder, read_csv_header, read_image,
                                                  spacing_columns_in, unit_from_column, write_image_folder_csv)
from mlmi_zoo.units import convert

__all__ = ["FolderCSVDataset", "UNIT_SUFFIXES", "unit_from_column", "has_unit_suffix", "read_csv_header",
           "spacing_columns_in", "list_image_folder", "write_image_folder_csv", "IMAGE_SUFFIXES"]

logger = logging.getLogger(__name__)

_INTEGER = re.compile(r"[+-]?\d+")  # a class number in the label column

@dataclass(frozen=True)
class _Row:
    row_number: int  # as a spreadsheet shows it (the header is row 1)
    image: Path
    label: int
    mask: Path | None
    concepts: dict[str, float]
    measurements: dict[str, float]
    spacing: tuple[float, ...] | None
    patient: str | None = None


class FolderCSVDataset(SizedDataset[dict[str, Any]]):
    """Images listed in a CSV with labels, lesion masks, concepts, measurements and spacing.

    Each sample: ``{"image": float32 (C, H, W) or (C, D, H, W), "label": int64 scalar,
    "concepts": {name: float32 scalar, NaN = missing}, "measurements": {name: float32 scalar in the
    column's unit}, "index": int}`` plus ``"spacing"`` (float32 ``(spatial_dims,)`` mm) when known
    and ``"mask"`` (bool ``(1, *spatial)``) when the CSV has a mask column.

    Args:
        csv_path: the CSV file.
        image_dir: folder image paths are relative to; default: the CSV's folder.
        label_column: column with the class (name or number).
        label_names: class names in index order; default: the labels the CSV holds (see the module
            docstring). With names given, a label is a name, or a class index when no name is an integer.
        concept_columns: numeric concept columns (blank = missing).
        spacing_columns: one column with ``"AxB[xC]"`` values, or one column per spatial axis; the unit
            comes from the name suffix (``spacing_mm``) and must be a length.
        image_column: column with the image path.
        measurement_columns: numeric columns with a unit suffix (``diameter_mm``, ``volume_ml``...).
        transform: optional callable applied to each sample dict.
        mask_column: column with the path of each image's lesion mask (blank = empty mask).
        channels: 1 or 3 to convert every PNG/JPEG/TIFF to greyscale or RGB on reading (``None``:
            as stored); a DICOM/NIfTI image with another channel count is refused.
        patient_column: column naming each image's patient (a blank cell is an error): samples carry
            it as ``"patient_id"``; ``None``: every image is its own patient.

    Attributes:
        label_names, measurement_units ({column: pint unit}), quantities (``QuantitySpec`` per
        measurement), csv_sha256, columns (the header), has_masks (a mask column with at least one mask).

    Raises:
        FileNotFoundError: the CSV or ``image_dir`` does not exist.
        ValueError: one error listing every bad row ("row N: column 'c': reason"; header = row 1).
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
        mask_column: str | None = None,
        channels: int | None = None,
        patient_column: str | None = None,
    ) -> None:
        self.csv_path = Path(csv_path)
        if not self.csv_path.is_file():
            raise FileNotFoundError(f"CSV not found: {str(self.csv_path)!r}")
        self.image_dir = Path(image_dir) if image_dir is not None else self.csv_path.parent
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image_dir not found: {str(self.image_dir)!r}")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
        self.label_column = label_column
        self.image_column = image_column
        self.mask_column = mask_column
        self.patient_column = patient_column
        self.channels = channels
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
                "image": self._check_file(cell[image_column], image_column, row_errors, required=True),
                "mask": (self._check_file(cell[mask_column], mask_column, row_errors, required=False)
                         if mask_column is not None else None),
                "concepts": {c: self._number(cell[c], c, row_errors, allow_blank=True) for c in self.concept_columns},
                "measurements": {m: self._number(cell[m], m, row_errors, allow_blank=True) for m in self.measurement_columns},
                "spacing": self._spacing(cell, spacing_unit, row_errors),
                "patient": cell[patient_column] if patient_column is not None else None,
            }
            if patient_column is not None and not cell[patient_column]:
                row_errors.append(f"column {patient_column!r}: empty patient")
            if not cell[label_column]:
                row_errors.append(f"column {label_column!r}: empty label")
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
            _Row(rn, item["image"], labels[rn], item["mask"], item["concepts"], item["measurements"], item["spacing"],
                 item["patient"])
            for rn, item in parsed
        ]
        self.has_masks = any(r.mask is not None for r in self._rows)

    # -- validation helpers ----------------------------------------------------------------------
    def _check_header(self, header: list[str], errors: list[str]) -> str | None:
        """Check the header (row 1); return the unit of the spacing columns (None if absent or bad)."""
        wanted = [self.image_column, self.label_column, *self.concept_columns, *self.measurement_columns,
                  *self.spacing_columns, *([self.mask_column] if self.mask_column is not None else []),
                  *([self.patient_column] if self.patient_column is not None else [])]
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

    def _check_file(self, value: str, column: str, errors: list[str], required: bool) -> Path | None:
        """The path in ``column`` (relative to ``image_dir``), or None for a blank optional cell."""
        if not value:
            if required:
                errors.append(f"column {column!r}: empty path")
            return None
        p = Path(value)
        p = p if p.is_absolute() else self.image_dir / p
        name = p.name.lower()
        if not p.exists():
            errors.append(f"column {column!r}: file not found: {str(p)!r}")
        elif p.is_file() and not name.endswith(IMAGE_SUFFIXES):
            errors.append(f"column {column!r}: unsupported image type {p.name!r}; expected one of "
                          f"{IMAGE_SUFFIXES} or a DICOM folder")
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
        where = "/".join(self.spacing_columns)
        if len(values) not in (2, 3):
            errors.append(f"column {where!r}: spacing {shown!r} must have 2 or 3 values such as '0.7x0.7'")
        if any(v <= 0 for v in values):
            errors.append(f"column {where!r}: spacing {shown!r} must be positive")
        if unit is None or any(math.isnan(v) for v in values):
            return None  # the error is already reported
        return tuple(float(convert(v, unit, "mm")) for v in values)

    def _encode_labels(
        self, raw: list[tuple[int, str]], label_names: Sequence[str] | None, errors: list[str]
    ) -> tuple[tuple[str, ...], dict[int, int]]:
        """The class names and each row's class index; bad labels are reported with their row and column."""
        column = self.label_column
        present = [(rn, v) for rn, v in raw if v]
        if label_names is not None:
            names = tuple(label_names)
            # Class numbers are accepted as indices only when no class is named by a number, otherwise
            # "1" could mean the class named "1" or the second class.
            by_index = not any(_INTEGER.fullmatch(n) for n in names)
        else:
            numbers = [(rn, v) for rn, v in present if _INTEGER.fullmatch(v)]
            words = [(rn, v) for rn, v in present if not _INTEGER.fullmatch(v)]
            if numbers and words:
                # The minority kind is the stray: name its rows, not every row of the majority.
                stray, kept = (words, numbers) if len(numbers) >= len(words) else (numbers, words)
                kind, others = ("a name", "class numbers") if stray is words else ("a number", "class names")
                for rn, v in stray:
                    errors.append(f"row {rn}: column {column!r}: label {v!r} is {kind} but {len(kept)} other rows "
                                  f"hold {others} (e.g. {kept[0][1]!r} in row {kept[0][0]}); correct it, or pass "
                                  "label_names (--labels) to say what the classes are")
                present = kept
            if present and _INTEGER.fullmatch(present[0][1]):
                values = sorted({int(v) for _, v in present})
                names = tuple(str(k) for k in values)
                present = [(rn, str(int(v))) for rn, v in present]
            else:
                names = tuple(sorted({v for _, v in present}))
            logger.debug("%s: classes taken from column %r (sorted): %s", self.csv_path.name, column, names)
            by_index = False
        out: dict[int, int] = {}
        for rn, v in present:
            if v in names:
                out[rn] = names.index(v)
            elif by_index and _INTEGER.fullmatch(v) and 0 <= int(v) < len(names):
                out[rn] = int(v)
            else:
                expected = f"one of {list(names)}" + (f" or a class index 0..{len(names) - 1}" if by_index else "")
                errors.append(f"row {rn}: column {column!r}: unknown label {v!r}; expected {expected}")
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

    def row_number(self, index: int) -> int:
        """The CSV row (header = row 1) of case ``index``, for messages that point at the file."""
        return self._rows[index].row_number

    @property
    def labels(self) -> tuple[int, ...]:
        """The class index of every case, in case order (read from the CSV, no image is opened)."""
        return tuple(r.label for r in self._rows)

    def rows_without_spacing(self, indices: Sequence[int] | None = None) -> list[int]:
        """CSV rows (of the cases ``indices``, default all) with no spacing: a blank spacing cell and a
        PNG/JPEG/TIFF, whose file stores none (a DICOM/NIfTI header gives it)."""
        chosen = range(len(self._rows)) if indices is None else indices
        return [self._rows[i].row_number for i in chosen
                if self._rows[i].spacing is None and self._rows[i].image.name.lower().endswith(_PIL_SUFFIXES)]

    def has_values(self, column: str, indices: Sequence[int] | None = None) -> bool:
        """Whether a measurement or concept ``column`` holds a number (not blank) in any of the cases ``indices``.

        Raises:
            KeyError: ``column`` is not one of the data set's measurement or concept columns.
        """
        if column not in self.measurement_columns and column not in self.concept_columns:
            raise KeyError(f"{column!r} is not a measurement or concept column of {self.csv_path.name}; they are "
                           f"{list(self.measurement_columns) + list(self.concept_columns)}")
        chosen = range(len(self._rows)) if indices is None else indices
        values = ({**self._rows[i].measurements, **self._rows[i].concepts}[column] for i in chosen)
        return any(math.isfinite(v) for v in values)

    def __len__(self) -> int:
        return len(self._rows)

    def unreadable(self, indices: Sequence[int] | None = None) -> list[str]:
        """The PNG/JPEG/TIFF/BMP images and masks (of the cases ``indices``, default all) that cannot be opened,
        one message each naming the row and column: checked from each file's header and structure
        (``PIL.Image.verify``), without decoding the pixels; DICOM/NIfTI files are read only when used."""
        from PIL import Image

        chosen = range(len(self._rows)) if indices is None else indices
        bad = []
        for i in chosen:
            row = self._rows[i]
            for column, path in ((self.image_column, row.image), (self.mask_column, row.mask)):
                if path is None or not path.name.lower().endswith(_PIL_SUFFIXES):
                    continue
                try:
                    with Image.open(path) as im:
                        im.verify()
                except Exception as e:  # noqa: BLE001 - PIL raises many types for a damaged file; each is reported
                    bad.append(f"row {row.row_number} of {self.csv_path.name}, column {column!r}: {path} cannot be "
                               f"read as an image ({type(e).__name__}: {e})")
        return bad

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self._rows[index]
        try:
            image, spacing = read_image(row.image, self.channels)
        except (OSError, ValueError, RuntimeError) as e:  # a damaged or unreadable file: say which row holds it
            raise ValueError(f"{self.csv_path.name} row {row.row_number}: column {self.image_column!r}: {row.image} "
                             f"cannot be read ({type(e).__name__}: {e})") from e
        if row.spacing is not None:
            if len(row.spacing) != image.ndim - 1:
                raise ValueError(
                    f"{self.csv_path.name} row {row.row_number}: column {'/'.join(self.spacing_columns)!r} gives "
                    f"{len(row.spacing)} spacing values but the image has {image.ndim - 1} spatial axes "
                    f"(shape {tuple(image.shape)})"
                )
            spacing = row.spacing
        sample: dict[str, Any] = {
            "image": image,
            "label": torch.tensor(row.label, dtype=torch.int64),
            "concepts": {k: torch.tensor(v, dtype=torch.float32) for k, v in row.concepts.items()},
            "measurements": {k: torch.tensor(v, dtype=torch.float32) for k, v in row.measurements.items()},
            "index": int(index),
        }
        if self.mask_column is not None:
            sample["mask"] = self._mask(row, tuple(image.shape[1:]))
        if spacing is not None:
            sample["spacing"] = torch.tensor(spacing, dtype=torch.float32)
        if row.patient is not None:
            sample["patient_id"] = row.patient
        return self.transform(sample) if self.transform is not None else sample

    @property
    def patients(self) -> list[str] | None:
        """Each row's patient (the ``patient_column``), or None without one."""
        return None if self.patient_column is None else [str(r.patient) for r in self._rows]

    def _mask(self, row: _Row, spatial: tuple[int, ...]) -> torch.Tensor:
        """(1, *spatial) bool lesion mask of ``row``: any non-zero pixel of the mask file; blank = empty."""
        if row.mask is None:
            return torch.zeros((1, *spatial), dtype=torch.bool)
        values, _ = read_image(row.mask, None)
        mask = (values != 0).any(0, keepdim=True)  # (1, *spatial): a colour mask is lesion where any channel is
        if tuple(mask.shape[1:]) != spatial:
            raise ValueError(f"{self.csv_path.name} row {row.row_number}: column {self.mask_column!r}: the mask "
                             f"{row.mask.name} is {tuple(mask.shape[1:])} but the image is {spatial}; save masks at "
                             "the image's size")
        return mask

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
                "mask": self.mask_column,
                "concepts": list(self.concept_columns),
                "measurements": dict(self.measurement_units),
                "spacing": list(self.spacing_columns),
                "patient": self.patient_column,
            },
            **({"num_patients": len(set(self.patients or []))} if self.patient_column is not None else {}),
        }

"""mini-MIAS: real film mammograms with radiologist truth circles at a real pixel size.

Data: J. Suckling et al., "The Mammographic Image Analysis Society Digital Mammogram Database",
Excerpta Medica, International Congress Series 1069, pp. 375-378, 1994 (the "mini" version reduced to
200 um pixels and padded to 1024 x 1024). Licence: **research use only**, cite the database in any
publication, never rent, lease or sell it (its ``Licence.txt``). The files are read from
``<root>/mias`` (``root``: an argument, else ``$MLMI_ZOO_DATA``): ``Info.txt`` and
``images/mdbNNN.png`` (lossless conversions of the original PGM files; ``.pgm`` is read too). Nothing
is downloaded and nothing is written there.

Truth (``Info.txt``, parsed by :func:`parse_info`): 330 rows for 322 images of 161 women; an image with
two or three abnormalities has one row each. Per row: background tissue F / G / D, the class of
abnormality (CALC, CIRC, SPIC, MISC, ARCH, ASYM or NORM), its severity (B / M) and the centre ``x, y``
and radius of a circle enclosing it, in pixels. Four abnormal images (mdb059, mdb216, mdb233, mdb245)
have no centre. **The y origin is the bottom-left corner**: the film row of a centre is
``1024 - y``. A radius in mm is the radius in pixels x 0.2 mm. Images mdbN (N odd) and mdbN+1 are the
two breasts of one woman, woman ``(N + 1) // 2``.

What we changed with respect to the files:

* **Orientation.** On every film the chest wall is on the image's right for odd numbers and on its
  left for even ones (checked on all 322; the L/R words of ``Info.txt`` and the mirror-reversed film
  markers disagree, so neither is used). Odd images are flipped left-right, circles with them, so
  the chest wall is **always on the left** of a returned image.
* **Pixel size.** Images are returned at ``spacing_mm`` in :data:`SPACINGS_MM`: each returned pixel is
  the mean of a ``k x k`` block of film pixels (``k = spacing_mm / 0.2``; an area average, so it does
  not alias, and the 204.8 mm field is kept exactly). ``"spacing"`` is ``(spacing_mm, spacing_mm)``.
  Pixel ``i`` of a returned axis covers ``[i s, (i + 1) s)`` mm, its centre at ``(i + 0.5) s``; a film
  centre (row, column) lies at ``((row + 0.5) 0.2, (column + 0.5) 0.2)`` mm.
* **Lesion mask** (``"mask"``, ``(1, H, W)``): the union of the radiologist's discs, rasterised on the
  returned grid (a pixel belongs to a disc when its centre does, and the pixel holding a disc's
  centre always does, so a 0.6 mm calcification cluster does not vanish at 1.6 mm). Empty for normal
  images and for the four abnormal images without a centre; ``"has_centre"`` says which images have
  circles, so that localisation is scored only on those.
* **Breast mask** (``"breast"``, ``(H, W)`` bool, :func:`breast_mask`): the smoothed film above
  :data:`BACKGROUND_MAX` grey levels, without the film labels and markers, opened with a 5 mm disc, its
  largest connected component with holes filled (scipy.ndimage). Inspected on all 322 films: the
  film labels and the edge strips are outside it; a band of the scanner that lies across the
  breast itself stays in (mdb002, mdb283), and the "08" marker written on the skin line of mdb274 is
  partly inside. Two radiologist circles lie off the tissue even so: mdb212 (beyond the skin line,
  nothing visible) and mdb214 (on the faint skin line).

Samples: ``{"image": float32 (1, H, W) in [0, 1], "mask": bool (1, H, W), "spacing": float32 (2,) mm,
"label": int64, "concepts": {"abnormality": class index in ABNORMALITY_CLASSES, "tissue": index in
TISSUES}, "measurements": {"radius_mm": radius of the largest circle, "diameter_mm": twice that, NaN
without one}, "index":
number - 1, "patient_id": "mias-wNNN", "name": "mdbNNN", "breast": bool (H, W), "abnormal": bool,
"has_centre": bool}``.
Labels: ``task="abnormal"`` (normal 0 / abnormal 1, all 322 images) or ``task="severity"`` (benign 0 /
malignant 1, abnormal images only; an image with a malignant and a benign finding, mdb144, is
malignant).

Splits (:func:`split_of_woman`): by woman, both breasts always together; train / val / test hold
about 60 / 20 / 20 % of the 161 women, stratified by the woman's worst finding (normal, benign,
malignant). :meth:`MIAS.cv_folds` partitions the training women only, for cross-validated choices.

The resampled images and both masks are built once per spacing, on first access (or all at once by
:meth:`MIAS.build_cache`), and cached under ``<cache_dir()>/mias/<spacing>mm/``
(:func:`mlmi_zoo.architectures.blocks.pretrained.cache_dir`); each file is written atomically (a
temporary file, then a rename) and rebuilt when its film changes size or modification time. A film
listed in the folder's ``MD5SUMS`` is checked against it when its entry is built.
:func:`breast_tiles` cuts a returned image into tiles of the breast for multiple-instance learning.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import einops
import numpy as np
import torch
from scipy import ndimage as ndi
from torch.nn import functional as F

from mlmi_zoo.architectures.blocks.pretrained import cache_dir
from mlmi_zoo.specs import ConceptSpec, QuantitySpec
from mlmi_zoo.training.data_spec import SizedDataset
from mlmi_zoo.training.datasets._location import data_file
from mlmi_zoo.training.datasets.medmnist import file_md5

__all__ = ["FILM_PIXEL_MM", "FILM_SIZE", "SPACINGS_MM", "TISSUES", "TISSUE_NAMES", "ABNORMALITY_CLASSES",
           "ABNORMALITY_NAMES", "SEVERITIES",
           "BACKGROUND_MAX", "OFF_TISSUE_CIRCLES", "Abnormality", "MiasRecord", "BreastTiles", "MIAS",
           "parse_info", "mias_folder", "split_of_woman", "check_spacing", "breast_mask", "circle_mask", "breast_tiles"]

logger = logging.getLogger(__name__)

FILM_PIXEL_MM = 0.2  # the mini-MIAS pixel edge
FILM_SIZE = 1024  # every film is 1024 x 1024 pixels
FIELD_MM = FILM_SIZE * FILM_PIXEL_MM  # 204.8 mm
SPACINGS_MM = (0.2, 0.4, 0.8, 1.6)  # k x k film pixels per returned pixel, k = 1, 2, 4, 8 (divides 1024)
NUM_IMAGES = 322
TISSUES = ("F", "G", "D")  # fatty, fatty-glandular, dense-glandular: ordered by density
TISSUE_NAMES = {"F": "fatty", "G": "fatty-glandular", "D": "dense-glandular"}
ABNORMALITY_CLASSES = ("NORM", "CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM")
ABNORMALITY_NAMES = {"NORM": "normal", "CALC": "calcification", "CIRC": "well-defined/circumscribed mass",
                     "SPIC": "spiculated mass", "MISC": "other, ill-defined mass",
                     "ARCH": "architectural distortion", "ASYM": "asymmetry"}
SEVERITIES = ("B", "M")
OFF_TISSUE_CIRCLES = ("mdb212", "mdb214")  # radiologist circles beyond / on the skin line
TASKS: dict[str, tuple[str, str]] = {"abnormal": ("normal", "abnormal"), "severity": ("benign", "malignant")}
SPLITS = ("train", "val", "test", "all")

# Breast mask, in grey levels of the 8-bit film and in mm, so that it means the same at every spacing.
# Chosen by inspecting the masks of all 322 films: at 20 the scanner's dim edge bands (mdb002, mdb283)
# join the breast; at 30 the mask still follows the visible skin line.
BACKGROUND_MAX = 30.0
_SMOOTH_MM = 1.0  # Gaussian sigma before thresholding (film grain, scanner noise)
_OPENING_MM = 5.0  # cuts edge strips and skin markers narrower than 10 mm from the breast
_LABEL_MIN = 180.0  # film labels are near-saturated (210-245)
_LABEL_AREA_MM2 = (20.0, 1500.0)  # a label is 1-5 cm^2; the pectoral muscle is larger
_LABEL_EXTENT = 0.8  # a label fills >= 80% of its bounding box once its lettering is filled
_LABEL_RING_MM = (2.0, 6.0)  # the band around a candidate that must be mostly background
_LABEL_RING_BACKGROUND = 0.5  # at 0.8 mm: labels >= 0.6 on all 322 films, bright tissue inside the breast <= 0.35
_LABEL_MARGIN_MM = 2.0  # the label's blurred edge goes with it

SPLIT_SALT = "mias-split-v1"
_CACHE_VERSION = 1
_HINT = ("mini-MIAS is distributed by the Mammographic Image Analysis Society (research use only); put "
         "Info.txt and images/mdbNNN.png (or .pgm) in <data>/mias; this library never downloads data")


# ---------------------------------------------------------------------------------------------
# Info.txt
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Abnormality:
    """One row of ``Info.txt`` with an abnormality: its class, severity and circle as on the film.

    Attributes:
        kind: one of ``ABNORMALITY_CLASSES`` except ``"NORM"``.
        severity: ``"B"`` (benign), ``"M"`` (malignant) or ``None`` when the row gives none.
        x_px, y_px: the centre as written (column; row counted up from the bottom), or ``None``.
        radius_px: the radius as written, in film pixels, or ``None``.
    """

    kind: str
    severity: str | None
    x_px: int | None
    y_px: int | None
    radius_px: int | None

    @property
    def has_centre(self) -> bool:
        """The row gives a centre and a radius."""
        return self.x_px is not None and self.y_px is not None and self.radius_px is not None

    @property
    def centre_mm(self) -> tuple[float, float] | None:
        """``(row_mm, col_mm)`` from the top-left corner of the film as stored (row = 1024 - y)."""
        if self.x_px is None or self.y_px is None:
            return None
        return ((FILM_SIZE - self.y_px + 0.5) * FILM_PIXEL_MM, (self.x_px + 0.5) * FILM_PIXEL_MM)

    @property
    def radius_mm(self) -> float | None:
        """The radius in mm: pixels x 0.2 mm."""
        return None if self.radius_px is None else self.radius_px * FILM_PIXEL_MM


@dataclass(frozen=True)
class MiasRecord:
    """What ``Info.txt`` says about one image (all its rows).

    Attributes:
        number: N of ``mdbN``, 1-322.
        tissue: background tissue, one of ``TISSUES``.
        abnormalities: one per abnormal row, in file order; empty for a normal image.
    """

    number: int
    tissue: str
    abnormalities: tuple[Abnormality, ...]

    @property
    def name(self) -> str:
        """``"mdbNNN"``."""
        return f"mdb{self.number:03d}"

    @property
    def woman(self) -> int:
        """The woman: images 2w - 1 and 2w are her two breasts."""
        return (self.number + 1) // 2

    @property
    def abnormal(self) -> bool:
        """At least one abnormality."""
        return bool(self.abnormalities)

    @property
    def malignant(self) -> bool:
        """At least one malignant abnormality."""
        return any(a.severity == "M" for a in self.abnormalities)

    @property
    def has_centre(self) -> bool:
        """Abnormal, with a circle for every abnormality (False for normal images and the four without)."""
        return self.abnormal and all(a.has_centre for a in self.abnormalities)

    @property
    def chest_wall_right(self) -> bool:
        """On the film as stored the chest wall is on the right (odd numbers), else on the left."""
        return self.number % 2 == 1

    @property
    def kind(self) -> str:
        """The abnormality class: ``"NORM"``, else the class of the largest circle (the first row without circles)."""
        if not self.abnormalities:
            return "NORM"
        return max(self.abnormalities, key=lambda a: a.radius_px or 0).kind

    def circles_mm(self) -> list[tuple[float, float, float]]:
        """The circles ``(row_mm, col_mm, radius_mm)`` on the returned (chest wall left) orientation."""
        out = []
        for a in self.abnormalities:
            centre, radius = a.centre_mm, a.radius_mm
            if centre is None or radius is None:
                continue
            col = FIELD_MM - centre[1] if self.chest_wall_right else centre[1]
            out.append((centre[0], col, radius))
        return out


_ROW = re.compile(r"^mdb(\d{3})\s")


def _row_error(path: Path, line_no: int, line: str, why: str) -> ValueError:
    return ValueError(f"{path}, line {line_no}: {why}; got {line.strip()!r}")


def _parse_row(path: Path, line_no: int, line: str) -> tuple[int, str, Abnormality | None]:
    tokens = line.split()
    number = int(tokens[0][3:])
    if len(tokens) < 3:
        raise _row_error(path, line_no, line, "expected at least `mdbNNN <tissue> <class>`")
    tissue, kind, rest = tokens[1], tokens[2], tokens[3:]
    if tissue not in TISSUES:
        raise _row_error(path, line_no, line, f"background tissue must be one of {TISSUES}")
    if kind not in ABNORMALITY_CLASSES:
        raise _row_error(path, line_no, line, f"class of abnormality must be one of {ABNORMALITY_CLASSES}")
    if kind == "NORM":
        if rest:
            raise _row_error(path, line_no, line, "a NORM row has nothing after its class")
        return number, tissue, None
    severity = rest.pop(0) if rest and rest[0] in SEVERITIES else None
    if rest and rest[0].startswith("*"):  # "*NOTE 3*": calcifications spread over the breast, no centre
        return number, tissue, Abnormality(kind, severity, None, None, None)
    if not rest:
        return number, tissue, Abnormality(kind, severity, None, None, None)
    if len(rest) != 3 or not all(t.isdigit() for t in rest):
        raise _row_error(path, line_no, line, "expected the centre x, y and the radius as three whole numbers of pixels")
    x, y, r = (int(t) for t in rest)
    if not (0 <= x <= FILM_SIZE and 0 <= y <= FILM_SIZE and r > 0):
        raise _row_error(path, line_no, line, f"centre outside the {FILM_SIZE}-pixel film or radius <= 0")
    return number, tissue, Abnormality(kind, severity, x, y, r)


def parse_info(path: str | os.PathLike[str]) -> tuple[MiasRecord, ...]:
    """Read ``Info.txt``: one record per image, in number order.

    Lines that do not start with ``mdbNNN`` (the header, notes) are skipped; every ``mdbNNN`` line must
    parse. Rows of one image are merged into one record.

    Args:
        path: the ``Info.txt`` file.

    Returns:
        The 322 records ``mdb001`` .. ``mdb322``.

    Raises:
        ValueError: a row that does not parse (file, line number and the row in the message), an image
            whose rows disagree on the tissue or mix NORM with abnormalities, or images missing from
            ``1 .. 322``.
    """
    path = Path(path)
    tissue: dict[int, str] = {}
    found: dict[int, list[Abnormality | None]] = {}
    with open(path, encoding="ascii", errors="replace") as fh:
        for line_no, line in enumerate(fh, start=1):
            if _ROW.match(line.strip() + " ") is None:
                continue
            number, t, abnormality = _parse_row(path, line_no, line)
            if tissue.setdefault(number, t) != t:
                raise _row_error(path, line_no, line, f"mdb{number:03d} was given tissue {tissue[number]!r} before")
            found.setdefault(number, []).append(abnormality)
    missing = sorted(set(range(1, NUM_IMAGES + 1)) - set(found))
    extra = sorted(set(found) - set(range(1, NUM_IMAGES + 1)))
    if missing or extra:
        raise ValueError(f"{path}: expected rows for the {NUM_IMAGES} images mdb001..mdb{NUM_IMAGES:03d}; "
                         f"missing {[f'mdb{n:03d}' for n in missing][:10]}, unexpected {[f'mdb{n:03d}' for n in extra][:10]}")
    records = []
    for number in sorted(found):
        rows = found[number]
        abnormalities = tuple(a for a in rows if a is not None)
        if (abnormalities and len(abnormalities) != len(rows)) or (not abnormalities and len(rows) != 1):
            raise ValueError(f"{path}: mdb{number:03d} has {len(rows)} rows mixing NORM with abnormalities "
                             f"or repeating NORM; expected one NORM row or only abnormal rows")
        records.append(MiasRecord(number, tissue[number], abnormalities))
    return tuple(records)


def mias_folder(root: str | os.PathLike[str] | None) -> Path:
    """The mini-MIAS folder: ``root`` itself when it holds ``Info.txt``, else ``<root>/mias``.

    Args:
        root: the data folder (holding ``mias/``), the ``mias`` folder itself, or ``None`` for
            ``$MLMI_ZOO_DATA``.

    Raises:
        DataNotFoundError: no folder given, or no ``Info.txt`` there; the message names the path looked
            at and ``$MLMI_ZOO_DATA``.
    """
    if root is not None and (Path(root) / "Info.txt").is_file():
        return Path(root)
    return data_file("mias/Info.txt", root, argument="root", hint=_HINT).parent


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------
def _has_severity(record: MiasRecord) -> bool:
    """Abnormal with a known severity: malignant, or every abnormality benign."""
    return record.malignant or (record.abnormal and all(a.severity == "B" for a in record.abnormalities))


def _woman_stratum(records: Sequence[MiasRecord]) -> int:
    """0: both breasts normal, 1: worst finding benign (or of unknown severity), 2: malignant."""
    if any(r.malignant for r in records):
        return 2
    return 1 if any(r.abnormal for r in records) else 0


def _deal(keys: Sequence[int], strata: Sequence[int], k: int, salt: str) -> dict[int, int]:
    """Fold ``0..k-1`` of each key, stratified: keys sorted by (stratum, sha256(salt, key)) dealt in turn.

    Written out rather than taken from scikit-learn's StratifiedKFold so that the published split
    does not depend on how a library version shuffles; one counter runs across the strata, so the
    folds differ in size by at most one and every stratum is spread evenly.
    """
    def digest(key: int) -> str:
        return hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()

    order = sorted(range(len(keys)), key=lambda i: (strata[i], digest(keys[i])))
    return {keys[i]: turn % k for turn, i in enumerate(order)}


def _women(records: Sequence[MiasRecord]) -> dict[int, list[MiasRecord]]:
    women: dict[int, list[MiasRecord]] = {}
    for r in records:
        women.setdefault(r.woman, []).append(r)
    return women


def split_of_woman(records: Sequence[MiasRecord]) -> dict[int, str]:
    """The split of every woman: the fixed, documented partition of the 161 women.

    Women are dealt into five folds stratified by their worst finding (:func:`_deal`, salt
    :data:`SPLIT_SALT`); fold 0 is ``"test"``, fold 1 ``"val"``, folds 2-4 ``"train"``.

    Args:
        records: all records of :func:`parse_info`.

    Returns:
        woman -> ``"train"`` / ``"val"`` / ``"test"``.
    """
    women = _women(records)
    ids = sorted(women)
    folds = _deal(ids, [_woman_stratum(women[w]) for w in ids], 5, SPLIT_SALT)
    return {w: "test" if folds[w] == 0 else "val" if folds[w] == 1 else "train" for w in ids}


# ---------------------------------------------------------------------------------------------
# masks and resampling
# ---------------------------------------------------------------------------------------------
def check_spacing(spacing_mm: object) -> float:
    """Validate a returned pixel size.

    Args:
        spacing_mm: the pixel edge in mm.

    Returns:
        The matching entry of :data:`SPACINGS_MM`.

    Raises:
        ValueError: not one of :data:`SPACINGS_MM`.
    """
    if not isinstance(spacing_mm, bool) and isinstance(spacing_mm, (int, float, np.floating)):
        for allowed in SPACINGS_MM:
            if math.isclose(float(spacing_mm), allowed, rel_tol=1e-6):
                return allowed
    raise ValueError(f"spacing_mm must be one of {SPACINGS_MM} (mm per returned pixel: the 0.2 mm film pixels "
                     f"averaged in k x k blocks, k = 1, 2, 4, 8), got {spacing_mm!r}")


def _edt(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every True pixel to the nearest False one, in pixels."""
    return cast(np.ndarray, ndi.distance_transform_edt(mask))


def _components(mask: np.ndarray) -> np.ndarray:
    """Connected components (4-connected) of ``mask``: 0 outside, 1..n inside."""
    return cast(tuple[np.ndarray, int], ndi.label(mask))[0]


def _opening(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary opening with a disc, by two Euclidean distance transforms (exact for any radius).

    Padded with background, so that a strip along the film's edge is opened like any other.
    """
    if radius_px < 0.5:
        return mask
    pad = int(math.ceil(radius_px)) + 1
    padded = np.pad(mask, pad)
    core = _edt(padded) > radius_px
    return (_edt(~core) <= radius_px)[pad:-pad, pad:-pad]


def _remove_film_labels(smooth: np.ndarray, tissue: np.ndarray, spacing_mm: float) -> np.ndarray:
    """``tissue`` without the film labels and markers that touch it.

    A label is a near-saturated component (> ``_LABEL_MIN``) of label size that fills its bounding
    box once its lettering is filled, and whose surrounding band (2-6 mm out) is mostly background.
    Bright tissue inside the breast has tissue all around; the pectoral muscle is a larger triangle.
    """
    out = tissue.copy()
    bright = _components(smooth > _LABEL_MIN)
    reach = int(math.ceil(_LABEL_RING_MM[1] / spacing_mm)) + 1
    for i, box in enumerate(ndi.find_objects(bright), start=1):
        if box is None:
            continue
        solid = ndi.binary_fill_holes(bright[box] == i)  # the lettering leaves holes in a label
        assert solid is not None
        area = float(solid.sum()) * spacing_mm ** 2
        if not _LABEL_AREA_MM2[0] <= area <= _LABEL_AREA_MM2[1] or solid.mean() < _LABEL_EXTENT:
            continue
        window = tuple(slice(max(s.start - reach, 0), min(s.stop + reach, n)) for s, n in zip(box, smooth.shape))
        component = np.zeros([w.stop - w.start for w in window], dtype=bool)
        component[tuple(slice(s.start - w.start, s.stop - w.start) for s, w in zip(box, window))] = solid
        distance_mm = _edt(~component) * spacing_mm
        ring = (distance_mm > _LABEL_RING_MM[0]) & (distance_mm <= _LABEL_RING_MM[1])
        if ring.any() and float((~tissue[window][ring]).mean()) >= _LABEL_RING_BACKGROUND:
            out[window] &= distance_mm > _LABEL_MARGIN_MM
    return out


def breast_mask(image: np.ndarray, spacing_mm: float) -> np.ndarray:
    """The breast (foreground) of a returned image, without film labels, markers and edge strips.

    Smooth (Gaussian, 1 mm), keep what is above :data:`BACKGROUND_MAX` grey levels, remove the film
    labels (:func:`_remove_film_labels`), open with a 5 mm disc, keep the largest connected
    component and fill its holes.

    Args:
        image: ``(H, W)`` film in grey levels of [0, 1] (the 8-bit value / 255).
        spacing_mm: its pixel edge in mm.

    Returns:
        ``(H, W)`` bool.

    Raises:
        ValueError: ``image`` is not 2D.
    """
    if image.ndim != 2:
        raise ValueError(f"image must be (H, W), got shape {image.shape}")
    grey = image.astype(np.float32) * 255.0
    smooth = ndi.gaussian_filter(grey, _SMOOTH_MM / spacing_mm)
    tissue = _remove_film_labels(smooth, smooth > BACKGROUND_MAX, spacing_mm)
    tissue = _opening(tissue, _OPENING_MM / spacing_mm)
    components = _components(tissue)
    if not components.any():
        return np.zeros_like(tissue)
    largest = int(np.bincount(components.ravel())[1:].argmax()) + 1
    filled = ndi.binary_fill_holes(components == largest)
    assert filled is not None
    return filled


def circle_mask(shape: tuple[int, int], spacing_mm: float,
                circles_mm: Sequence[tuple[float, float, float]]) -> np.ndarray:
    """The union of discs on a grid of ``spacing_mm`` pixels.

    A pixel belongs to a disc when its centre ``((i + 0.5) s, (j + 0.5) s)`` is within the radius, and
    the pixel holding the disc's centre always does (a disc smaller than a pixel is not lost).

    Args:
        shape: ``(H, W)`` of the grid.
        spacing_mm: its pixel edge in mm.
        circles_mm: ``(row_mm, col_mm, radius_mm)`` per disc, from the grid's top-left corner.

    Returns:
        ``(H, W)`` bool.
    """
    rows = (np.arange(shape[0]) + 0.5) * spacing_mm
    cols = (np.arange(shape[1]) + 0.5) * spacing_mm
    mask = np.zeros(shape, dtype=bool)
    for row, col, radius in circles_mm:
        mask |= (rows[:, None] - row) ** 2 + (cols[None, :] - col) ** 2 <= radius ** 2
        i, j = int(row // spacing_mm), int(col // spacing_mm)
        if 0 <= i < shape[0] and 0 <= j < shape[1]:
            mask[i, j] = True
    return mask


def _read_film(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode != "L" or im.size != (FILM_SIZE, FILM_SIZE):
            raise ValueError(f"{path}: expected an 8-bit grey {FILM_SIZE} x {FILM_SIZE} film, got mode {im.mode!r} "
                             f"and size {im.size}")
        return np.asarray(im, dtype=np.uint8)


def _listed_md5s(folder: Path) -> dict[str, str]:
    """``images/mdbNNN.png`` -> md5 from the folder's ``MD5SUMS``, when there is one."""
    listing = folder / "MD5SUMS"
    if not listing.is_file():
        return {}
    out = {}
    for line in listing.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[1].lstrip("*")] = parts[0].lower()
    return out


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------
def _signature(path: Path, spacing_mm: float) -> str:
    st = path.stat()
    return json.dumps([_CACHE_VERSION, path.name, st.st_size, st.st_mtime_ns, spacing_mm])


def _load_current(path: Path, signature: str) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file built from the same film and rule, else ``None`` (absent, stale, unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["signature"]) != signature:
                return None
            return {k: z[k] for k in ("image", "breast", "mask")}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        logger.warning("rebuilding unreadable cache file %s (%s: %s)", path, type(err).__name__, err)
        return None


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` through a temporary file in its folder and a rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # pyright: ignore[reportArgumentType]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# the data set
# ---------------------------------------------------------------------------------------------
class MIAS(SizedDataset[dict[str, Any]]):
    """One split of mini-MIAS as a torch ``Dataset`` of sample dicts (see the module docstring).

    Args:
        root: the data folder holding ``mias/`` (or the ``mias`` folder itself); ``None`` reads
            ``$MLMI_ZOO_DATA``.
        split: ``"train"``, ``"val"``, ``"test"`` (women, see :func:`split_of_woman`) or ``"all"``.
        spacing_mm: returned pixel edge, one of :data:`SPACINGS_MM`.
        task: ``"abnormal"`` (normal 0 / abnormal 1) or ``"severity"`` (benign 0 / malignant 1; normal
            images, and abnormal ones of unknown severity, excluded).
        transform: optional callable applied to each sample dict.

    Attributes:
        records: the split's :class:`MiasRecord` in image order; label_names, spacing, folder,
            concept_specs, quantities.

    Raises:
        DataNotFoundError: no data folder given, or no ``mias/Info.txt`` in it.
        ValueError: unknown split or task, a spacing not in :data:`SPACINGS_MM`, a malformed
            ``Info.txt``. Reading a sample raises ``FileNotFoundError`` for a missing film and
            ``ValueError`` for a film that is not 8-bit 1024 x 1024 or whose MD5 differs from the
            folder's ``MD5SUMS``.
    """

    concept_specs = (
        ConceptSpec("abnormality", "categorical", levels=ABNORMALITY_CLASSES),
        ConceptSpec("tissue", "ordinal", levels=TISSUES),
    )
    quantities = (QuantitySpec("radius_mm", "mm"), QuantitySpec("diameter_mm", "mm"))
    spacing_range = (0.4, 0.8)  # the pixel edges (mm) a spacing check renders the same film at (see render)

    def __init__(self, root: str | os.PathLike[str] | None = None, split: str = "train", spacing_mm: float = 0.8,
                 task: str = "abnormal",
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
        self.spacing_mm = check_spacing(spacing_mm)
        self.spacing = (self.spacing_mm, self.spacing_mm)
        self.split, self.task, self.transform = split, task, transform
        self.label_names = TASKS[task]
        self.folder = mias_folder(root)
        self.all_records = parse_info(self.folder / "Info.txt")
        splits = split_of_woman(self.all_records)
        self.records = [r for r in self.all_records
                        if (split == "all" or splits[r.woman] == split) and (task == "abnormal" or _has_severity(r))]
        self.size = int(round(FIELD_MM / self.spacing_mm))  # returned images are size x size
        self._cache_folder = cache_dir() / "mias" / f"{self.spacing_mm:g}mm"
        self._siblings: dict[float, MIAS] = {}  # the same split at other spacings (render)

    def render(self, index: int, spacing: Sequence[float]) -> dict[str, Any]:
        """The case whose ``"index"`` is ``index`` (image number - 1: the same film, breast and circles) at
        another pixel edge, for a check that a model states the same millimetres whatever the pixel size
        (the evaluation's spacing invariance, which records each case's ``"index"``).

        Args:
            index: the case's ``"index"`` field; the case must be in this split.
            spacing: ``(dy, dx)`` mm, two equal values from :data:`SPACINGS_MM`.

        Raises:
            ValueError: an anisotropic spacing or one not in :data:`SPACINGS_MM`, an index not in this split.
        """
        values = {float(v) for v in spacing}
        if len(values) != 1:
            raise ValueError(f"mini-MIAS films are rendered with square pixels; got spacing {list(spacing)}")
        value = check_spacing(values.pop())
        position = next((i for i, r in enumerate(self.records) if r.number - 1 == index), None)
        if position is None:
            raise ValueError(f"no image with index {index} (mdb{index + 1:03d}) in the {self.split!r} split")
        if math.isclose(value, self.spacing_mm):
            return self[position]
        if value not in self._siblings:
            self._siblings[value] = MIAS(self.folder, split=self.split, spacing_mm=value, task=self.task,
                                         transform=self.transform)
        return self._siblings[value][position]

    # -- files -------------------------------------------------------------------------------------
    def image_path(self, record: MiasRecord) -> Path:
        """The film of ``record``: ``images/mdbNNN.png``, else ``.pgm`` (the original format).

        Raises:
            FileNotFoundError: neither file exists.
        """
        for suffix in (".png", ".pgm"):
            path = self.folder / "images" / f"{record.name}{suffix}"
            if path.is_file():
                return path
        raise FileNotFoundError(f"{record.name}: neither {self.folder / 'images' / record.name}.png nor .pgm exists; "
                                f"the mini-MIAS folder {self.folder} is incomplete")

    def files_read(self) -> list[Path]:
        """The source files this split reads: ``Info.txt`` and its films."""
        return [self.folder / "Info.txt", *(self.image_path(r) for r in self.records)]

    def source_checksums(self, records: Sequence[MiasRecord] | None = None) -> dict[str, Any]:
        """sha256 of ``Info.txt`` and of the sorted ``(file name, sha256)`` listing of the films read.

        Args:
            records: the images to list; ``None`` means all of this split.

        Returns:
            ``{"Info.txt": {"sha256"}, "films": {"num_files", "sha256_of_listing"}}``.
        """
        from mlmi_zoo._weights import sha256_file

        chosen = self.records if records is None else records
        films = sorted([p.name, sha256_file(p)] for p in (self.image_path(r) for r in chosen))
        return {"Info.txt": {"sha256": sha256_file(self.folder / "Info.txt")},
                "films": {"num_files": len(films),
                          "sha256_of_listing": hashlib.sha256(json.dumps(films).encode()).hexdigest()}}

    @functools.cached_property
    def _listed_md5s(self) -> dict[str, str]:
        return _listed_md5s(self.folder)

    def _cache_path(self, record: MiasRecord) -> Path:
        return self._cache_folder / f"{record.name}.npz"

    def _build_entry(self, record: MiasRecord, path: Path, expected_md5: str | None) -> dict[str, np.ndarray]:
        if expected_md5 is not None and (actual := file_md5(path)) != expected_md5:
            raise ValueError(f"{path}: MD5 differs from {self.folder / 'MD5SUMS'} (expected {expected_md5}, got "
                             f"{actual}); the file is corrupt or not the mini-MIAS film")
        film = _read_film(path)
        if record.chest_wall_right:
            film = film[:, ::-1]  # chest wall to the left
        k = int(round(self.spacing_mm / FILM_PIXEL_MM))
        image = einops.reduce(film.astype(np.float32), "(h a) (w b) -> h w", "mean", a=k, b=k) / 255.0
        shape = (image.shape[0], image.shape[1])
        return {"image": image.astype(np.float32), "breast": breast_mask(image, self.spacing_mm),
                "mask": circle_mask(shape, self.spacing_mm, record.circles_mm())}

    def _entry(self, record: MiasRecord) -> dict[str, np.ndarray]:
        """The cached arrays of ``record``, built (and written atomically) when absent or stale."""
        path = self.image_path(record)
        signature = _signature(path, self.spacing_mm)
        cached = _load_current(self._cache_path(record), signature)
        if cached is not None:
            return cached
        entry = self._build_entry(record, path, self._listed_md5s.get(f"images/{path.name}"))
        _save_atomic(self._cache_path(record), {**entry, "signature": np.array(signature)})
        return entry

    def build_cache(self) -> int:
        """Build every absent or stale cache entry of this split now, with a progress bar.

        Entries are otherwise built on first access; this front-loads the work (e.g. before
        starting data-loader workers).

        Returns:
            The number of entries built.
        """
        from tqdm.auto import tqdm

        todo = [r for r in self.records
                if _load_current(self._cache_path(r), _signature(self.image_path(r), self.spacing_mm)) is None]
        if todo:
            logger.info("caching %d mini-MIAS films at %g mm under %s", len(todo), self.spacing_mm,
                        self._cache_folder)
        for record in tqdm(todo, desc=f"caching mini-MIAS at {self.spacing_mm:g} mm", leave=False, mininterval=2.0,
                           disable=None):
            self._entry(record)
        return len(todo)

    # -- Dataset -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def label_of(self, record: MiasRecord) -> int:
        """The label of ``record`` under this data set's task."""
        return int(record.abnormal) if self.task == "abnormal" else int(record.malignant)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        entry = self._entry(record)
        circles = record.circles_mm()
        radius = max((c[2] for c in circles), default=math.nan)
        values = torch.tensor([ABNORMALITY_CLASSES.index(record.kind), TISSUES.index(record.tissue), radius],
                              dtype=torch.float32).unbind()
        sample = {
            "image": torch.from_numpy(entry["image"])[None],  # (1, H, W)
            "mask": torch.from_numpy(entry["mask"])[None],  # (1, H, W)
            "spacing": torch.tensor(self.spacing, dtype=torch.float32),  # (2,) mm
            "label": torch.tensor(self.label_of(record), dtype=torch.int64),
            "concepts": {"abnormality": values[0], "tissue": values[1]},
            "measurements": {"radius_mm": values[2], "diameter_mm": 2.0 * values[2]},
            "index": record.number - 1,
            "patient_id": f"mias-w{record.woman:03d}",
            "name": record.name,
            "breast": torch.from_numpy(entry["breast"]),  # (H, W)
            "abnormal": record.abnormal,
            "has_centre": record.has_centre,
        }
        return self.transform(sample) if self.transform is not None else sample

    # -- splits ------------------------------------------------------------------------------------
    def cv_folds(self, k: int = 5) -> list[tuple[list[int], list[int]]]:
        """``k`` folds over the training women, for cross-validated choices; test women never appear.

        Women of the ``"train"`` split are dealt into ``k`` folds stratified by their worst finding
        (the rule of :func:`split_of_woman` with its own salt); both breasts stay in one fold.

        Args:
            k: number of folds, 2 .. the number of training women.

        Returns:
            ``k`` pairs ``(fit, held_out)`` of indices into this data set.

        Raises:
            ValueError: this is not the ``"train"`` split, or ``k`` is out of range.
        """
        if self.split != "train":
            raise ValueError(f"cv_folds partitions the training women only; this data set is split={self.split!r}")
        women = _women(self.records)
        if not 2 <= k <= len(women):
            raise ValueError(f"k must be in 2..{len(women)} (the training women), got {k}")
        ids = sorted(women)
        folds = _deal(ids, [_woman_stratum(women[w]) for w in ids], k, f"{SPLIT_SALT}:cv{k}")
        position = {r.number: i for i, r in enumerate(self.records)}
        out = []
        for fold in range(k):
            held = sorted(position[r.number] for w in ids if folds[w] == fold for r in women[w])
            fit = sorted(set(range(len(self.records))) - set(held))
            out.append((fit, held))
        return out

    def split_table(self) -> dict[str, int]:
        """Counts of this split: women, images, abnormal and malignant images, images with circles."""
        return {"women": len({r.woman for r in self.records}), "images": len(self.records),
                "abnormal": sum(r.abnormal for r in self.records),
                "malignant": sum(r.malignant for r in self.records),
                "with_centre": sum(r.has_centre for r in self.records)}

    def __repr__(self) -> str:
        return (f"MIAS(split={self.split!r}, spacing_mm={self.spacing_mm}, task={self.task!r}, n={len(self)}, "
                f"size={self.size})")


# ---------------------------------------------------------------------------------------------
# tiles for multiple-instance learning
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BreastTiles:
    """The breast tiles of one image.

    Attributes:
        boxes: ``(N, 4)`` int64 ``(row0, col0, row1, col1)``, ends exclusive, returned pixels.
        images: ``(N, C, t, t)`` the tiles.
        instance_truth: ``(N,)`` float32: 1 where the tile holds a pixel of ``"mask"``, 0 elsewhere,
            NaN on every tile of an abnormal image without a circle.
        lesion_area_mm2: ``(N,)`` float32 area of ``"mask"`` (the radiologists' discs) inside the tile in
            mm², NaN where ``instance_truth`` is.
        breast_fraction: ``(N,)`` float32 share of the tile's pixels in ``"breast"``.
        tile_px / stride_px: tile side and step in pixels; tile_mm: the tile side in mm.
    """

    boxes: torch.Tensor  # (N, 4)
    images: torch.Tensor  # (N, C, t, t)
    instance_truth: torch.Tensor  # (N,)
    lesion_area_mm2: torch.Tensor  # (N,)
    breast_fraction: torch.Tensor  # (N,)
    tile_px: int
    stride_px: int
    tile_mm: float


def _to_px(value_mm: float, spacing_mm: float, name: str) -> int:
    px = int(round(value_mm / spacing_mm))
    if not math.isfinite(value_mm) or value_mm <= 0 or px < 1:
        raise ValueError(f"{name} must be a length in mm of at least one pixel ({spacing_mm} mm), got {value_mm!r}")
    return px


def breast_tiles(sample: dict[str, Any], tile_mm: float, stride_mm: float | None = None,
                 min_breast_fraction: float = 0.5) -> BreastTiles:
    """Cut the breast of a :class:`MIAS` sample into square tiles (instances of a bag).

    Rule: tiles of ``round(tile_mm / s)`` pixels on a grid stepping ``round(stride_mm / s)`` pixels
    from the top-left corner (a remainder narrower than a tile at the right and bottom edge is not
    tiled); a tile is kept when at least ``min_breast_fraction`` of its pixels are breast. A tile's
    instance truth is 1 when it overlaps a radiologist's circle (holds at least one pixel of the
    rasterised ``"mask"``), 0 when it does not, and NaN for every tile of an abnormal image whose
    abnormalities have no circle (its truth per tile is unknown). Normal images have truth 0. A tile's
    lesion area is the number of its ``"mask"`` pixels times the pixel area (NaN where the truth is).

    Args:
        sample: a sample with ``"image"`` (C, H, W), ``"mask"`` (1, H, W), ``"breast"`` (H, W),
            ``"spacing"`` (2,) mm, ``"abnormal"`` and ``"has_centre"``.
        tile_mm: tile side in mm.
        stride_mm: grid step in mm; ``None`` means ``tile_mm`` (no overlap).
        min_breast_fraction: the least breast share of a kept tile, in [0, 1].

    Returns:
        A :class:`BreastTiles` (possibly with no tile).

    Raises:
        ValueError: a missing key, anisotropic spacing, a tile larger than the image, or a length or
            fraction out of range.
    """
    missing = [k for k in ("image", "mask", "breast", "spacing", "abnormal", "has_centre") if k not in sample]
    if missing:
        raise ValueError(f"sample lacks {missing}; breast_tiles takes a MIAS sample (image, mask, breast, spacing, "
                         f"abnormal, has_centre)")
    if not 0.0 <= min_breast_fraction <= 1.0:
        raise ValueError(f"min_breast_fraction must be in [0, 1], got {min_breast_fraction!r}")
    spacing = torch.as_tensor(sample["spacing"], dtype=torch.float64)
    if spacing.shape != (2,) or not math.isclose(float(spacing[0]), float(spacing[1]), rel_tol=1e-6):
        raise ValueError(f"sample['spacing'] must be two equal pixel edges in mm, got {spacing.tolist()}")
    s = float(spacing[0])
    image, lesion = sample["image"], torch.as_tensor(sample["mask"]).float()
    breast = torch.as_tensor(sample["breast"]).float()[None]  # (1, H, W)
    tile_px = _to_px(tile_mm, s, "tile_mm")
    stride_px = _to_px(tile_mm if stride_mm is None else stride_mm, s, "stride_mm")
    h, w = image.shape[-2:]
    if tile_px > min(h, w):
        raise ValueError(f"tile_mm={tile_mm} is {tile_px} pixels at {s} mm, larger than the {h} x {w} image")
    fraction = F.avg_pool2d(breast[None], tile_px, stride_px)[0, 0]  # (nr, nc)
    touched = F.max_pool2d(lesion[None], tile_px, stride_px)[0, 0] > 0  # (nr, nc)
    covered = F.avg_pool2d(lesion[None], tile_px, stride_px)[0, 0] * (tile_px * s) ** 2  # (nr, nc) mm² of disc
    keep = fraction >= min_breast_fraction
    nr, nc = fraction.shape
    grid_r, grid_c = torch.meshgrid(torch.arange(nr) * stride_px, torch.arange(nc) * stride_px, indexing="ij")
    boxes = torch.stack([grid_r, grid_c, grid_r + tile_px, grid_c + tile_px], dim=-1)[keep]  # (N, 4)
    tiles = image.unfold(-2, tile_px, stride_px).unfold(-2, tile_px, stride_px)  # (C, nr, nc, t, t)
    tiles = einops.rearrange(tiles, "c nr nc th tw -> nr nc c th tw")[keep]  # (N, C, t, t)
    truth, area = touched[keep].float(), covered[keep].float()
    if bool(sample["abnormal"]) and not bool(sample["has_centre"]):
        truth = torch.full_like(truth, math.nan)  # a lesion somewhere, no circle: unknown per tile
        area = torch.full_like(area, math.nan)
    return BreastTiles(boxes.long(), tiles.contiguous(), truth, area, fraction[keep], tile_px, stride_px, tile_px * s)


"""IDRiD: real fundus photographs with diabetic-retinopathy grades and pixel-level lesion masks.

Data: the Indian Diabetic Retinopathy Image Dataset, P. Porwal et al., "Indian Diabetic Retinopathy
Image Dataset (IDRiD): a database for diabetic retinopathy screening research", Data 3(3):25, 2018;
and P. Porwal et al., "IDRiD: Diabetic Retinopathy - Segmentation and Grading Challenge", Medical
Image Analysis 59:101561, 2020. Licence CC BY 4.0. Kowa VX-10alpha camera, 50 degree field, original
frame 4288 x 2848 pixels. The files are read from ``<root>/idrid`` (``root``: an argument, else
``$MLMI_ZOO_DATA``); nothing is downloaded and nothing is written there.

Two data sets, two disjoint sets of photographs (no published mapping between them):

* :class:`IDRiDGrading`: 516 photographs (413 official train / 103 official test) with the DR grade
  0-4 (ICDR scale, the ``"label"``; with ``task="referable"`` the label is referable DR, grade >= 2,
  moderate non-proliferative DR or worse, the usual referral threshold of screening programmes) and
  the risk of diabetic macular edema 0-2 (``"dme_risk"``), and the optic-disc and fovea centres.
  The JPEGs are read at 1/4 of the original frame (1072 x 712, as stored in the data folder;
  full-resolution copies are decoded at that scale); the centres are given in the original frame
  and are scaled to the returned grid.
* :class:`IDRiDSegmentation`: 81 photographs (54 / 27) at full resolution with five masks drawn by
  retina specialists: microaneurysms (MA), haemorrhages (HE), hard exudates (EX), soft exudates (SE)
  and the optic disc (OD), returned as a ``(5, H, W)`` ``"mask"`` in :data:`LESIONS` order with a
  ``(5,)`` boolean ``"annotated"``. A missing mask file means *not annotated* (``annotated=False``,
  an all-zero channel that must not be read as "no lesion"): SE exists for 26 + 14 images only and HE
  is missing for training image IDRiD_43. An annotated, empty mask means *absent*. No grade is
  published for these photographs: their ``"label"`` is -1.

Splits. ``"test"`` is the official test part. ``"train"`` and ``"val"`` partition the official
training part with a fixed rule (scikit-learn's ``train_test_split``, ``random_state=0``): grading,
20% for validation stratified by DR grade (330 train / 83 val); segmentation, 10 of the 54 images
for validation stratified by whether SE is annotated (44 / 10). The unit of every split is one
photograph: IDRiD publishes no patient or eye identity, so each photograph is its own
``"patient_id"`` (``"<set>/<official part>/<image id>"``); two photographs of one eye, if any, could
fall into different splits and nothing in the data lets us prevent it.

Resolution. Both sets are returned on one grid: the full original frame at long side ``size``
(default 512, at most 1072; ``H = round(2848 * size / 4288)``), so one returned pixel covers the same
field angle in both. Photographs are read on the 1072 x 712 frame (grading: as stored; segmentation:
decoded at 1/4 scale by the JPEG decoder) and averaged over each returned pixel's bin (torch's
adaptive average pooling). Masks are read at full resolution and *max*-pooled over the bins of the
same grid (adaptive max pooling: a returned pixel is lesion when any source pixel in its bin is): a
microaneurysm a few pixels wide would vanish under averaging or nearest-neighbour sampling; with
this rule no lesion disappears and areas can only grow by the quantisation (areas in
``"measurements"`` are counted at full resolution instead). Coordinates use the pixel-index
convention on both grids (source pixel ``x`` spans ``[x, x + 1)``):
``x_returned = (x_original + 0.5) * W / 4288 - 0.5``. The resized copies are built once and cached
under ``<cache_dir()>/idrid/<size>/{grading,segmentation}/{train,test}/`` (see
:func:`mlmi_zoo.architectures.blocks.pretrained.cache_dir`), each file written atomically (temporary
file, then rename) and rebuilt when its source files change size or modification time.

Field of view (``"fov"``, ``(H, W)`` bool). The black surround of a fundus photograph is not tissue.
On the 1072 x 712 frame the red channel, smoothed over 5 x 5 pixels, is thresholded at
:data:`FOV_RED_THRESHOLD` (the surround is <= 8 of 255 on the images we inspected, the fundus >= 50),
the largest connected component is kept and its holes are filled (scipy.ndimage). On the returned
grid a pixel is in the FOV when any of its source pixels is, the rule of the masks. The lesion masks
are intersected with the FOV at full resolution (``clip_to_fov=True``, the default), so every
returned lesion pixel lies in ``"fov"``: the HE mask of test image IDRiD_61 marks a stray stroke in
the black surround, 4.1% of its pixels, that this removes. Every other mask of the 81 images lies at
least 99.9% inside the FOV at full resolution (the lowest, HE of training image IDRiD_17: 99.93%;
:meth:`IDRiDSegmentation.fov_coverage`).

Physical unit: the optic-disc diameter, ``DD`` (``mlmi_zoo.units``: its own base dimension, so it
never converts to mm; the files carry no pixel size in mm). ``"dd_px"`` is the disc diameter in
returned pixels (along x) and ``"spacing"`` is DD per returned pixel, ``(dy, dx) = (1 / dd_px_y,
1 / dd_px_x)``, in unit **DD**, not mm (the two differ by the rounding of ``H``, 0.02% at 512). For a
segmentation image the disc diameter is the equivalent diameter ``sqrt(4 A / pi)`` of its own OD
mask at full resolution. Grading images have no OD mask; for them the one rule is the median of that
diameter over the 54 official training segmentation images (:func:`median_disc_diameter`: 524.6 px
at full resolution; 5th-95th percentile of the 54 discs 466-603 px, so a grading image's DD is
uncertain by about +-12%), scaled to the returned grid. The other estimate, the fovea-to-disc-centre
distance taken as 2.5 DD, cannot be checked against the masks: the segmentation images have no fovea
position. Measured with the median DD, the fovea-to-disc distance of the 516 grading images has
median 2.50 DD (5th-95th percentile 2.24-2.75 DD), so the two estimates agree on average.

Measurements (where the data have truth): segmentation images, ``"ma_area_dd2"``, ``"he_area_dd2"``,
``"ex_area_dd2"``, ``"se_area_dd2"`` (each lesion type's area within the FOV, DD^2, from the
full-resolution mask and the image's own disc diameter; NaN where the type is not annotated);
grading images, ``"fovea_x_px"`` / ``"fovea_y_px"`` (returned pixels) and ``"fovea_od_distance_dd"``
(DD), with ``"fovea_xy"`` and ``"optic_disc_xy"`` as ``(x, y)`` tensors. The macular-edema grade is
defined by hard exudates within 1 DD of the fovea (:func:`macula_region`); the distance from the
fovea to the nearest exudate cannot be computed for segmentation images, because no fovea position
is given for them, while for grading images the fovea is given but no exudate mask is.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Sequence, cast

import numpy as np
import torch
from numpy.typing import ArrayLike

from mlmi_zoo.architectures.blocks.pretrained import cache_dir
from mlmi_zoo.training.data_spec import SizedDataset
from mlmi_zoo.training.datasets._location import DataNotFoundError, data_file
from mlmi_zoo.training.datasets.idrid_io import (_HINT, ORIGINAL_HW, STORED_GRADING_HW, _atomic_write, _int,
                                                 _load_or_build, _pool, _prepare, _read_mask, _read_rgb, _resize_image,
                                                 _rows, _signature, source_checksums)

__all__ = ["LESIONS", "LESION_NAMES", "DR_GRADES", "DME_RISKS", "DEFAULT_SIZE", "MIN_SIZE", "MAX_SIZE",
           "FOV_RED_THRESHOLD", "MEASUREMENT_UNITS", "GRADING_TASKS", "REFERABLE_MIN_GRADE", "IDRiDGrading",
           "IDRiDSegmentation", "check_size",
           "returned_shape", "original_to_returned", "field_of_view", "macula_region", "disc_diameters",
           "median_disc_diameter", "idrid_folder", "idrid_dataset", "source_checksums"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LESIONS = ("MA", "HE", "EX", "SE", "OD")
LESION_NAMES = {"MA": "microaneurysms", "HE": "haemorrhages", "EX": "hard exudates", "SE": "soft exudates",
                "OD": "optic disc"}
DR_GRADES = ("no apparent retinopathy", "mild NPDR", "moderate NPDR", "severe NPDR", "PDR")
REFERABLE_MIN_GRADE = 2  # ICDR moderate NPDR or worse: referable diabetic retinopathy
DME_RISKS = ("no apparent hard exudates", "hard exudates outside 1 DD of the macula centre",
             "hard exudates within 1 DD of the macula centre")
GRADING_TASKS: dict[str, tuple[str, ...]] = {
    "grade": tuple(f"{i} {name}" for i, name in enumerate(DR_GRADES)),
    "referable": ("non-referable (grade 0-1)", "referable (grade 2-4)"),
    "dme": tuple(f"{i} {name}" for i, name in enumerate(DME_RISKS)),
}
DEFAULT_SIZE = 512
MIN_SIZE = 32
MAX_SIZE = STORED_GRADING_HW[1]  # larger would upsample the stored grading photographs
FOV_RED_THRESHOLD = 20.0  # of 255, on the 5x5-smoothed red channel
MEASUREMENT_UNITS = {"ma_area_dd2": "DD^2", "he_area_dd2": "DD^2", "ex_area_dd2": "DD^2", "se_area_dd2": "DD^2",
                     "fovea_x_px": "px", "fovea_y_px": "px", "fovea_od_distance_dd": "DD"}
GRADING_VAL_FRACTION = 0.2
SEGMENTATION_VAL_COUNT = 10
SPLIT_SEED = 0


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
def check_size(size: object) -> int:
    """Validate the long side ``size`` of the returned images.

    Args:
        size: long side in pixels.

    Returns:
        ``size`` as an ``int``.

    Raises:
        ValueError: not an integer in ``[MIN_SIZE, MAX_SIZE]``.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(
            f"size must be an integer long side in pixels between {MIN_SIZE} and {MAX_SIZE} (the stored grading "
            f"photographs are {STORED_GRADING_HW[1]} wide; larger would only upsample them), got {size!r}")
    return int(size)


def returned_shape(size: int) -> tuple[int, int]:
    """``(H, W)`` of the returned grid at long side ``size``: the full 4288 x 2848 frame, aspect kept.

    Raises:
        ValueError: a bad ``size`` (see :func:`check_size`).
    """
    size = check_size(size)
    return int(round(ORIGINAL_HW[0] * size / ORIGINAL_HW[1])), size


def original_to_returned(xy: ArrayLike, size: int) -> np.ndarray:
    """Map ``(x, y)`` pixel coordinates of the original 4288 x 2848 frame to the returned grid.

    Pixel-index convention on both grids (pixel ``i`` spans ``[i, i + 1)``):
    ``x' = (x + 0.5) * W / 4288 - 0.5``, likewise ``y`` with ``H / 2848``.

    Args:
        xy: ``(..., 2)`` coordinates ``(x, y)`` in original pixels.
        size: the returned long side.

    Returns:
        ``(..., 2)`` float64 coordinates in returned pixels.
    """
    h, w = returned_shape(size)
    scale = np.array([w / ORIGINAL_HW[1], h / ORIGINAL_HW[0]])
    return (np.asarray(xy, dtype=np.float64) + 0.5) * scale - 0.5


def macula_region(fovea_xy: Sequence[float] | np.ndarray | torch.Tensor, dd_px: float | torch.Tensor,
                  shape: Sequence[int], radius_dd: float = 1.0) -> torch.Tensor:
    """The disc of radius ``radius_dd`` optic-disc diameters around the fovea, as a boolean mask.

    The IDRiD macular-edema grade 2 means hard exudates within 1 DD of the macula centre (Porwal et
    al. 2018); with the sample's ``"fovea_xy"`` and ``"dd_px"`` this is that region.

    Args:
        fovea_xy: ``(x, y)`` of the fovea in pixels of the grid ``shape``.
        dd_px: the optic-disc diameter in pixels of that grid.
        shape: ``(H, W)`` of the grid.
        radius_dd: radius in DD.

    Returns:
        ``(H, W)`` bool tensor, True where the pixel centre lies within ``radius_dd * dd_px`` of the fovea.

    Raises:
        ValueError: ``fovea_xy`` not two finite numbers, ``dd_px`` or ``radius_dd`` not positive, or
            ``shape`` not two positive integers.
    """
    xy = torch.as_tensor(fovea_xy, dtype=torch.float64).reshape(-1)
    if xy.numel() != 2 or not bool(torch.isfinite(xy).all()):
        raise ValueError(f"fovea_xy must be two finite numbers (x, y), got {fovea_xy!r}")
    dd = float(dd_px)
    if not (math.isfinite(dd) and dd > 0):
        raise ValueError(f"dd_px must be a positive number of pixels, got {dd_px!r}")
    if not (math.isfinite(radius_dd) and radius_dd > 0):
        raise ValueError(f"radius_dd must be a positive number of optic-disc diameters, got {radius_dd!r}")
    hw = tuple(int(s) for s in shape)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"shape must be (H, W) with two positive integers, got {tuple(shape)!r}")
    ys = torch.arange(hw[0], dtype=torch.float64)[:, None]
    xs = torch.arange(hw[1], dtype=torch.float64)[None, :]
    return (xs - xy[0]) ** 2 + (ys - xy[1]) ** 2 <= (radius_dd * dd) ** 2


def field_of_view(rgb: np.ndarray) -> np.ndarray:
    """The field of view of a fundus photograph: the illuminated disc, without the black surround.

    Meant for the 1072 x 712 frame (a 5 x 5 smoothing removes JPEG noise at that scale): the red
    channel above :data:`FOV_RED_THRESHOLD`, its largest connected component, holes filled.

    Args:
        rgb: ``(H, W, 3)`` uint8 photograph.

    Returns:
        ``(H, W)`` bool mask.

    Raises:
        ValueError: ``rgb`` is not ``(H, W, 3)``.
    """
    from scipy import ndimage

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be an (H, W, 3) photograph, got shape {rgb.shape}")
    red = ndimage.uniform_filter(rgb[..., 0].astype(np.float32), size=5)
    bright = red > FOV_RED_THRESHOLD
    # scipy is untyped: label returns (labels, count) with the default arguments
    labels, n = cast(tuple[np.ndarray, int], ndimage.label(bright))
    if n == 0:
        return bright
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    largest = labels == int(np.argmax(counts))
    # holes = background components that do not touch the frame; the same result as
    # ndimage.binary_fill_holes, which dilates iteratively and costs twice as long at this size
    background, _ = cast(tuple[np.ndarray, int], ndimage.label(~largest))
    outside = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
    return ~np.isin(background, outside[outside > 0])


def idrid_folder(root: str | os.PathLike[str] | None) -> Path:
    """The ``idrid`` folder under the data root: ``root``, else ``$MLMI_ZOO_DATA``.

    Args:
        root: the folder that holds ``idrid/``, or ``None`` for ``$MLMI_ZOO_DATA``.

    Raises:
        DataNotFoundError: no root given, or ``idrid/grading/labels/train.csv`` is not under it.
    """
    return data_file("idrid/grading/labels/train.csv", root, argument="root", hint=_HINT).parents[2]


def _equivalent_diameter(area_px: float) -> float:
    return 2.0 * math.sqrt(area_px / math.pi)


def _segmentation_files(folder: Path, part: str) -> list[tuple[str, Path, dict[str, Path | None]]]:
    """(image id, photograph, {lesion: mask file or None when not annotated}) of one official part."""
    images = sorted((folder / "segmentation" / "images" / part).glob("IDRiD_*.jpg"))
    if not images:
        raise DataNotFoundError(f"no IDRiD_*.jpg in {folder / 'segmentation' / 'images' / part}. {_HINT}")
    out = []
    for img in images:
        masks: dict[str, Path | None] = {}
        for code in LESIONS:
            p = folder / "segmentation" / "masks" / part / code / f"{img.stem}_{code}.png"
            masks[code] = p if p.is_file() else None
        out.append((img.stem, img, masks))
    return out


def disc_diameters(root: str | os.PathLike[str] | None = None) -> dict[str, float]:
    """Equivalent diameter (full-resolution pixels) of the OD mask of each official training segmentation image.

    Computed once from the 54 masks and cached in ``<cache_dir()>/idrid/disc_diameters.json``.

    Args:
        root: the folder that holds ``idrid/``, or ``None`` for ``$MLMI_ZOO_DATA``.

    Returns:
        ``{image id: diameter}``.

    Raises:
        DataNotFoundError: the data are not found.
    """
    folder = idrid_folder(root)
    files = [(name, od) for name, _, masks in _segmentation_files(folder, "train") if (od := masks["OD"]) is not None]
    signature = _signature([p for _, p in files])
    path = cache_dir() / "idrid" / "disc_diameters.json"
    try:
        cached = json.loads(path.read_text())
        if cached["signature"] == signature:
            return {k: float(v) for k, v in cached["diameters"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    diameters = {name: _equivalent_diameter(float(np.count_nonzero(_read_mask(p)))) for name, p in files}
    text = json.dumps({"signature": signature, "diameters": diameters}, indent=1).encode()

    def write(fh: IO[bytes]) -> None:
        fh.write(text)

    _atomic_write(path, write)
    return diameters


def median_disc_diameter(root: str | os.PathLike[str] | None = None) -> float:
    """The median optic-disc diameter of the official training segmentation images, full-resolution pixels.

    Args:
        root: the folder that holds ``idrid/``, or ``None`` for ``$MLMI_ZOO_DATA``.

    Raises:
        DataNotFoundError: the data are not found.
    """
    return float(np.median(list(disc_diameters(root).values())))


def _split_ids(ids: list[str], strata: list[int], n_val: float | int, split: str) -> list[str]:
    """The ``split`` part of the official training ``ids``: a stratified, seeded, fixed partition."""
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(ids, test_size=n_val, stratify=strata, random_state=SPLIT_SEED)
    return sorted(val if split == "val" else train)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return "test" if split == "test" else "train"


# ---------------------------------------------------------------------------------------------
# the grading set
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _GradingCase:
    image_id: str
    image: Path
    grade: int
    dme_risk: int
    fovea: tuple[float, float]  # (x, y), original frame
    optic_disc: tuple[float, float]


class IDRiDGrading(SizedDataset[dict[str, Any]]):
    """One split of the IDRiD grading set (516 photographs) as sample dicts; see the module docstring.

    Each sample: ``{"image": float32 (3, H, W) in [0, 1], "label": int64 DR grade 0-4 (``task="grade"``),
    referable DR 0/1 (``task="referable"``: grade >= :data:`REFERABLE_MIN_GRADE`) or the DME risk 0-2
    (``task="dme"``), "fov": bool
    (H, W), "spacing": float32 (2,) DD per pixel (dy, dx), "concepts": {}, "measurements":
    {"fovea_x_px", "fovea_y_px", "fovea_od_distance_dd"} (float32), "index": int, "patient_id": str,
    "image_id": str, "dme_risk": int64 0-2, "fovea_xy", "optic_disc_xy": float32 (2,) returned pixels,
    "dd_px": float32}``. There is no ``"mask"``: grading photographs have no lesion masks.

    Args:
        root: the folder that holds ``idrid/``, or ``None`` for ``$MLMI_ZOO_DATA``.
        split: ``"train"`` (330), ``"val"`` (83, stratified by grade) or ``"test"`` (103, official).
        size: long side of the returned images in pixels (``MIN_SIZE``-``MAX_SIZE``).
        prepare: build the missing cache entries of the split now (a progress bar); ``False`` builds
            each one when it is first read.
        transform: optional callable applied to each sample dict.
        task: what ``"label"`` holds: ``"grade"`` (the ICDR grade, 5 classes), ``"referable"``
            (grade >= 2, 2 classes) or ``"dme"`` (the macular-edema risk 0-2, 3 classes, as
            ``"dme_risk"``); the splits are the same for all (stratified by grade).

    Attributes:
        label_names, dme_names, image_ids, official_part, size, shape ``(H, W)``, dd_px (the median
        disc diameter in returned pixels along x), spacing_unit (``"DD"``), folder, cache_folder.

    Raises:
        DataNotFoundError: no data root given, or files missing under it.
        ValueError: bad ``split``, ``size`` or ``task``; a CSV or photograph that is not as published.
    """

    set_name = "grading"
    label_names = GRADING_TASKS["grade"]
    dme_names = tuple(f"{i} {name}" for i, name in enumerate(DME_RISKS))
    spacing_unit = "DD"

    def __init__(self, root: str | os.PathLike[str] | None = None, split: str = "train", size: int = DEFAULT_SIZE,
                 prepare: bool = True, transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 task: str = "grade") -> None:
        if task not in GRADING_TASKS:
            raise ValueError(f"task must be one of {tuple(GRADING_TASKS)}, got {task!r}")
        self.task = task
        self.label_names = GRADING_TASKS[task]
        self.official_part = _check_split(split)
        self.size = check_size(size)
        self.shape = returned_shape(self.size)
        self.split = split
        self.transform = transform
        self.folder = idrid_folder(root)
        cases = self._read_part(self.official_part)
        if split != "test":
            ids = sorted(cases)
            keep = _split_ids(ids, [cases[i].grade for i in ids], GRADING_VAL_FRACTION, split)
            cases = {i: cases[i] for i in keep}
        self.cases = [cases[i] for i in sorted(cases)]
        self.image_ids = tuple(c.image_id for c in self.cases)
        self.median_dd_original = median_disc_diameter(self.folder.parent)
        self.dd_px_yx = (self.median_dd_original * self.shape[0] / ORIGINAL_HW[0],
                         self.median_dd_original * self.shape[1] / ORIGINAL_HW[1])
        self.dd_px = self.dd_px_yx[1]
        self.cache_folder = cache_dir() / "idrid" / str(self.size) / "grading" / self.official_part
        self._entries = [(self.cache_folder / f"{c.image_id}.npz", _signature([c.image])) for c in self.cases]
        if prepare:
            _prepare(self._entries, self._build_entry, f"grading {self.official_part}")

    def _read_part(self, part: str) -> dict[str, _GradingCase]:
        labels_csv = self.folder / "grading" / "labels" / f"{part}.csv"
        labels = _rows(labels_csv, ("Image name", "Retinopathy grade", "Risk of macular edema"))
        centres = {}
        for kind in ("fovea", "optic_disc"):
            path = self.folder / "localization" / f"{kind}_{part}.csv"
            rows = _rows(path, ("Image No", "X- Coordinate", "Y - Coordinate"))
            try:
                centres[kind] = {r[0]: (float(r[1]), float(r[2])) for r in rows}
            except ValueError as err:
                raise ValueError(f"{path}: coordinates must be numbers ({err})") from err
        cases = {}
        for image_id, grade, dme in labels:
            missing = [k for k in centres if image_id not in centres[k]]
            if missing:
                raise ValueError(f"{labels_csv}: {image_id} has no row in localization/{missing[0]}_{part}.csv")
            cases[image_id] = _GradingCase(
                image_id, self.folder / "grading" / "images" / part / f"{image_id}.jpg",
                _int(labels_csv, grade, f"{image_id} retinopathy grade", 0, 4),
                _int(labels_csv, dme, f"{image_id} risk of macular edema", 0, 2),
                centres["fovea"][image_id], centres["optic_disc"][image_id])
        return cases

    def _build_entry(self, i: int) -> dict[str, np.ndarray]:
        rgb = _read_rgb(self.cases[i].image)
        fov = _pool(field_of_view(rgb)[None], self.shape, "max")[0] > 0  # any source pixel, as for the masks
        return {"image": _resize_image(rgb, self.shape), "fov": fov}

    def _entry(self, i: int) -> dict[str, np.ndarray]:
        path, signature = self._entries[i]
        return _load_or_build(path, signature, lambda: self._build_entry(i))

    def files_read(self, image_ids: Sequence[str] | None = None) -> list[Path]:
        """The source files this split reads: the three CSVs of its official part and its photographs.

        Args:
            image_ids: only these photographs (default: all of the split).
        """
        part = self.official_part
        csvs = [self.folder / "grading" / "labels" / f"{part}.csv",
                *(self.folder / "localization" / f"{k}_{part}.csv" for k in ("fovea", "optic_disc"))]
        keep = set(self.image_ids if image_ids is None else image_ids)
        return csvs + [c.image for c in self.cases if c.image_id in keep]

    # how each lesion type looks: the image-processing control of its map (bright exudates, dark red lesions)
    control_appearance = {"microaneurysms": "dark", "haemorrhages": "dark", "hard_exudates": "bright",
                          "soft_exudates": "bright"}

    def concept_mask_set(self, split: str) -> SizedDataset[dict[str, Any]]:
        """The segmentation photographs of ``split`` at this size, with every lesion type's mask
        (``"concept_masks"``): the evaluation scores a graded model's maps on ``concept_mask_set("test")``,
        the 27 official segmentation test photographs, as the grading photographs have no masks."""
        from mlmi_zoo.training.datasets.idrid_joined import IDRiDLesions  # it builds on this module

        task = self.task if self.task in ("referable", "grade") else "referable"  # the masks do not depend on it
        return IDRiDLesions(self.folder.parent, split, self.size, True, self.transform, task, "segmentation")

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        entry = self._entry(index)
        fovea = original_to_returned(case.fovea, self.size)
        disc = original_to_returned(case.optic_disc, self.size)
        distance_dd = math.dist(case.fovea, case.optic_disc) / self.median_dd_original
        measurements = torch.tensor([fovea[0], fovea[1], distance_dd], dtype=torch.float32).unbind()
        sample = {
            "image": torch.from_numpy(entry["image"]).float() / 255.0,
            "label": torch.tensor(self.label_of(index), dtype=torch.int64),
            "fov": torch.from_numpy(entry["fov"]),
            "spacing": torch.tensor([1.0 / d for d in self.dd_px_yx], dtype=torch.float32),
            "concepts": {},
            "measurements": dict(zip(("fovea_x_px", "fovea_y_px", "fovea_od_distance_dd"), measurements)),
            "index": int(index),
            "patient_id": f"grading/{self.official_part}/{case.image_id}",
            "image_id": case.image_id,
            "dme_risk": torch.tensor(case.dme_risk, dtype=torch.int64),
            "fovea_xy": torch.tensor(fovea, dtype=torch.float32),
            "optic_disc_xy": torch.tensor(disc, dtype=torch.float32),
            "dd_px": torch.tensor(self.dd_px, dtype=torch.float32),
        }
        return self.transform(sample) if self.transform is not None else sample

    def _label(self, grade: int) -> int:
        """The ``"label"`` of a photograph of ICDR ``grade`` under ``task="grade"`` or ``"referable"``."""
        return grade if self.task == "grade" else int(grade >= REFERABLE_MIN_GRADE)

    def fovea_positions(self) -> np.ndarray:
        """(N, 2) the fovea ``(x, y)`` of every case in returned pixels, without reading a photograph."""
        return np.array([original_to_returned(c.fovea, self.size) for c in self.cases]).reshape(-1, 2)

    def label_of(self, index: int) -> int:
        """The ``"label"`` of case ``index`` without reading its photograph."""
        case = self.cases[index]
        return case.dme_risk if self.task == "dme" else self._label(case.grade)

    def __repr__(self) -> str:
        return (f"IDRiDGrading(split={self.split!r}, task={self.task!r}, size={self.size}, n={len(self)}, "
                f"shape={self.shape})")


# ---------------------------------------------------------------------------------------------
# the segmentation set
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SegmentationCase:
    image_id: str
    image: Path
    masks: dict[str, Path | None]  # lesion code -> file, None when not annotated


class IDRiDSegmentation(SizedDataset[dict[str, Any]]):
    """One split of the IDRiD segmentation set (81 photographs) as sample dicts; see the module docstring.

    Each sample: ``{"image": float32 (3, H, W) in [0, 1], "label": int64 -1 (no grade published),
    "mask": bool (5, H, W) in :data:`LESIONS` order, "annotated": bool (5,), "fov": bool (H, W),
    "spacing": float32 (2,) DD per pixel (dy, dx), "concepts": {lesion name: 1.0 present / 0.0 absent
    / NaN not annotated} for MA, HE, EX, SE, "measurements": {"ma_area_dd2", "he_area_dd2", "ex_area_dd2",
    "se_area_dd2"} (NaN not annotated), "index": int,
    "patient_id": str, "image_id": str, "dd_px": float32}``.

    Args:
        root: the folder that holds ``idrid/``, or ``None`` for ``$MLMI_ZOO_DATA``.
        split: ``"train"`` (44), ``"val"`` (10, stratified by SE annotated) or ``"test"`` (27, official).
        size: long side of the returned images in pixels (``MIN_SIZE``-``MAX_SIZE``).
        clip_to_fov: intersect the lesion masks with the FOV (default); ``False`` returns them as drawn.
        prepare: build the missing cache entries of the split now (a progress bar); ``False`` builds
            each one when it is first read.
        transform: optional callable applied to each sample dict.
        union: lesion codes (e.g. ``("MA", "HE", "EX", "SE")`` or ``"MA+HE+EX+SE"``): ``"mask"`` is then ``(1, H, W)``, the
            union of those lesions' masks where they are annotated, and ``"annotated"`` ``(1,)``
            (any of them annotated), the form a localization metric against "any lesion" reads.
            ``None`` (default): the five masks.

    Attributes:
        lesions (:data:`LESIONS`), image_ids, annotated (``(N, 5)`` bool: which mask files exist),
        official_part, size, shape ``(H, W)``, spacing_unit (``"DD"``), folder, cache_folder.

    Raises:
        DataNotFoundError: no data root given, or files missing under it.
        ValueError: bad ``split`` or ``size``; a photograph or mask of an unexpected size.
    """

    set_name = "segmentation"
    lesions = LESIONS
    label_names: tuple[str, ...] = ()
    spacing_unit = "DD"

    def __init__(self, root: str | os.PathLike[str] | None = None, split: str = "train", size: int = DEFAULT_SIZE,
                 clip_to_fov: bool = True, prepare: bool = True,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 union: Sequence[str] | None = None) -> None:
        if union is not None:
            codes = union.split("+") if isinstance(union, str) else list(union)  # "MA+HE" (a data-spec string)
            unknown = [c for c in codes if c not in LESIONS]
            if not codes or unknown:
                raise ValueError(f"union must name lesions among {LESIONS}, got {union!r}")
            self.union: tuple[str, ...] | None = tuple(codes)
        else:
            self.union = None
        self.official_part = _check_split(split)
        self.size = check_size(size)
        self.shape = returned_shape(self.size)
        self.split = split
        self.clip_to_fov = clip_to_fov
        self.transform = transform
        self.folder = idrid_folder(root)
        cases = {name: _SegmentationCase(name, img, masks)
                 for name, img, masks in _segmentation_files(self.folder, self.official_part)}
        if split != "test":
            ids = sorted(cases)
            se = [int(cases[i].masks["SE"] is not None) for i in ids]
            cases = {i: cases[i] for i in _split_ids(ids, se, SEGMENTATION_VAL_COUNT, split)}
        self.cases = [cases[i] for i in sorted(cases)]
        self.image_ids = tuple(c.image_id for c in self.cases)
        self.annotated = np.array([[c.masks[k] is not None for k in LESIONS] for c in self.cases], dtype=bool)
        no_disc = [c.image_id for c in self.cases if c.masks["OD"] is None]
        if no_disc:
            raise DataNotFoundError(f"no OD mask for {no_disc} in {self.folder / 'segmentation' / 'masks'}; every "
                                    f"IDRiD segmentation image has one, so the folder is incomplete. {_HINT}")
        self.cache_folder = cache_dir() / "idrid" / str(self.size) / "segmentation" / self.official_part
        self._entries = [(self.cache_folder / f"{c.image_id}.npz",
                          _signature([c.image, *(c.masks[k] for k in LESIONS)])) for c in self.cases]
        if prepare:
            _prepare(self._entries, self._build_entry, f"segmentation {self.official_part}")

    def _build_entry(self, i: int) -> dict[str, np.ndarray]:
        case = self.cases[i]
        rgb = _read_rgb(case.image)  # the 1072 x 712 frame, as for the grading photographs
        fov_small = field_of_view(rgb)
        fov_full = np.repeat(np.repeat(fov_small, 4, axis=0), 4, axis=1)
        drawn = np.zeros((len(LESIONS), *self.shape), dtype=bool)
        clipped = np.zeros_like(drawn)
        annotated = np.zeros(len(LESIONS), dtype=bool)
        coverage = np.full(len(LESIONS), np.nan)
        area_drawn = np.zeros(len(LESIONS))
        area_in_fov = np.zeros(len(LESIONS))
        for k, code in enumerate(LESIONS):
            path = case.masks[code]
            if path is None:
                continue
            full = _read_mask(path)
            annotated[k] = True
            inside = full & fov_full  # clipped at full resolution, where the FOV boundary is sharp
            area_drawn[k] = np.count_nonzero(full)
            area_in_fov[k] = np.count_nonzero(inside)
            if area_drawn[k]:
                coverage[k] = area_in_fov[k] / area_drawn[k]
            drawn[k], clipped[k] = _pool(np.stack([full, inside]), self.shape, "max") > 0
        # the same "any source pixel" rule for the FOV keeps every clipped lesion pixel inside it
        fov = _pool(fov_small[None], self.shape, "max")[0] > 0
        return {"image": _resize_image(rgb, self.shape), "fov": fov, "masks_drawn": drawn, "masks": clipped,
                "annotated": annotated, "fov_coverage": coverage,
                "area_drawn": area_drawn, "area_in_fov": area_in_fov}

    def _entry(self, i: int) -> dict[str, np.ndarray]:
        path, signature = self._entries[i]
        return _load_or_build(path, signature, lambda: self._build_entry(i))

    def files_read(self, image_ids: Sequence[str] | None = None) -> list[Path]:
        """The source files this split reads: its photographs and their mask files.

        Args:
            image_ids: only these photographs (default: all of the split).
        """
        keep = set(self.image_ids if image_ids is None else image_ids)
        return [p for c in self.cases if c.image_id in keep
                for p in (c.image, *(c.masks[k] for k in LESIONS)) if p is not None]

    def fov_coverage(self) -> dict[str, dict[str, float]]:
        """Share of each drawn mask's full-resolution pixels inside the FOV, per image and lesion.

        Returns:
            ``{image id: {lesion code: share}}``; NaN where the lesion is not annotated or its mask is empty.
        """
        out = {}
        for i, case in enumerate(self.cases):
            share = self._entry(i)["fov_coverage"]
            out[case.image_id] = {code: float(share[k]) for k, code in enumerate(LESIONS)}
        return out

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        entry = self._entry(index)
        fov = entry["fov"]
        masks = entry["masks"] if self.clip_to_fov else entry["masks_drawn"]
        annotated = entry["annotated"]
        # the disc diameter from the OD mask as drawn, the same rule as disc_diameters()
        dd_original = _equivalent_diameter(float(entry["area_drawn"][LESIONS.index("OD")]))
        dd_yx = (dd_original * self.shape[0] / ORIGINAL_HW[0], dd_original * self.shape[1] / ORIGINAL_HW[1])
        present = [float(masks[k].any()) if annotated[k] else math.nan for k in range(len(LESIONS) - 1)]
        concepts = torch.tensor(present, dtype=torch.float32).unbind()
        areas = {f"{c.lower()}_area_dd2": torch.tensor(float(entry["area_in_fov"][k]) / dd_original ** 2
                                                      if annotated[k] else math.nan, dtype=torch.float32)
                 for k, c in enumerate(LESIONS[:-1])}
        mask, annotated_out = torch.from_numpy(masks), torch.from_numpy(annotated)
        if self.union is not None:
            rows = [LESIONS.index(c) for c in self.union]
            keep = annotated_out[rows]
            mask = (mask[rows] & keep[:, None, None]).any(0, keepdim=True)
            annotated_out = keep.any().reshape(1)
        sample = {
            "image": torch.from_numpy(entry["image"]).float() / 255.0,
            "label": torch.tensor(-1, dtype=torch.int64),
            "mask": mask,
            "annotated": annotated_out,
            "fov": torch.from_numpy(fov),
            "spacing": torch.tensor([1.0 / d for d in dd_yx], dtype=torch.float32),
            "concepts": {LESION_NAMES[c].replace(" ", "_"): v for c, v in zip(LESIONS[:-1], concepts)},
            "measurements": areas,
            "index": int(index),
            "patient_id": f"segmentation/{self.official_part}/{case.image_id}",
            "image_id": case.image_id,
            "dd_px": torch.tensor(dd_yx[1], dtype=torch.float32),
        }
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (f"IDRiDSegmentation(split={self.split!r}, size={self.size}, n={len(self)}, shape={self.shape}, "
                f"clip_to_fov={self.clip_to_fov}" + (f", union={self.union}" if self.union else "") + ")")


# ---------------------------------------------------------------------------------------------
# what the data specs use
# ---------------------------------------------------------------------------------------------
def idrid_dataset(dataset: str = "grading", split: str = "train", **kwargs: Any) -> SizedDataset[dict[str, Any]]:
    """One split of an IDRiD set (the ``idrid`` kind of a data spec).

    Args:
        dataset: ``"grading"`` (:class:`IDRiDGrading`), ``"segmentation"`` (:class:`IDRiDSegmentation`),
            ``"macula"`` (:class:`~mlmi_zoo.training.datasets.idrid_joined.IDRiDMacula`: both, for a
            macular-edema model) or ``"lesions"`` (:class:`~mlmi_zoo.training.datasets.idrid_joined.IDRiDLesions`:
            both, for a lesion-concept model of DR).
        split: ``"train"``, ``"val"`` or ``"test"``.
        **kwargs: the data set's other arguments (``root``, ``size``, ``clip_to_fov``...).

    Raises:
        ValueError: an unknown ``dataset``, or what the data set raises.
    """
    if dataset == "grading":
        return IDRiDGrading(split=split, **kwargs)
    if dataset == "segmentation":
        return IDRiDSegmentation(split=split, **kwargs)
    if dataset in ("macula", "lesions"):
        from mlmi_zoo.training.datasets.idrid_joined import IDRiDLesions, IDRiDMacula

        return (IDRiDMacula if dataset == "macula" else IDRiDLesions)(split=split, **kwargs)
    raise ValueError(f"dataset must be 'grading', 'segmentation', 'macula' or 'lesions', got {dataset!r}")



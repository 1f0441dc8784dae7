"""``mlmi-zoo explain MODEL FILE… --out report.html``: explain medical image files from the shell.

Each file (DICOM PS3.10 file or series folder, NIfTI-1/-2 volume, PNG/JPEG/TIFF/BMP picture, or a
folder of them) is read with the spacing its header states, turned into the input the model was
trained on, explained by ``model.explain(x, spacing=…)``, and written into one self-contained HTML
report; one line per file goes to stdout. Formats: DICOM (NEMA PS3.10, *Digital Imaging and
Communications in Medicine*), NIfTI-1 (Cox et al., "A (sort of) new image data format standard:
NIfTI-1", 2004) and NIfTI-2, read through MONAI (:mod:`mlmi_zoo.training.datasets.medical_io`).

From a file to the network input, in this order:

1. **Read.** DICOM/NIfTI arrive channel-first in the file's voxel index order ``(i, j[, k])``
   (MONAI's convention: for DICOM ``i`` is the column, ``j`` the row), intensities rescaled (CT in
   HU), spacing in mm from the header (DICOM PixelSpacing and slice positions, the NIfTI affine).
   Pictures are read with PIL in the same ``(i, j)`` = (column, row) order, scaled to ``[0, 1]`` by
   their bit depth; they carry no spacing, so ``--spacing`` gives it. A header's spacing is always
   used; ``--spacing`` applies to files without one.
2. **Intensities.** For a model with an intensity window (CT in HU), DICOM/NIfTI values are taken
   in the window's unit (NIfTI stores no unit: they are assumed to be in it), and a picture's
   display values ``[0, 1]`` are taken as the window's output (``low + v (high - low)``). For a
   model without a window, picture values are used as they are (times ``high`` for a ``scale``
   transform) and DICOM/NIfTI values are rescaled by their minimum and maximum to that range.
3. **Channels.** The file's channels must equal the model's; a colour picture whose three channels
   are equal is read as grey. Anything else is refused with what to do.
4. **Spatial dims.** A 3D volume into a 2D model is refused unless ``--slice middle`` or
   ``--slice N`` picks one slice along ``k``; a 2D image into a 3D model is refused. A volume
   with a single slice is a 2D image.
5. **Layout.** The spatial axes are reversed into the model's layout: ``(row, column)`` in 2D,
   ``(slice, row, column)`` in 3D, as the zoo's data sets store them.
6. **Scale and size.** A model with a canonical spacing: the image is resampled to it, and the
   model's input size (or ``--size``) is cut around the centre of the image, or around
   ``--center i,j[,k]`` (voxel indices of the file, in the order of step 1), padding outside the
   image with the value the intensity transform maps to 0 (air for a CT window). Measurements
   then come out in mm of the file's physical frame. A model without one (MedMNIST-style data
   resized whole) gets the whole image resized to its input size.
7. **Explain** with the spacing of the network input, so the physical heads report mm, mm² or mL.

All values given per axis on the command line (``--spacing``, ``--center``, ``--size``) follow
one order: ``--spacing`` and ``--center`` the file's ``(i, j[, k])``, ``--size`` the model's
layout (step 5).
"""
from __future__ import annotations

import argparse
import html
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mlmi_zoo.base import InterpretableModel
from mlmi_zoo.cli import _Parser
from mlmi_zoo.explanations import Explanation, html_table, render_page
from mlmi_zoo.specs import InputSpec, Measurement

__all__ = ["explain_files", "expand_paths", "read_file", "prepare_input", "parse_spacing", "measurements_of",
           "summary_line", "ReadImage", "PreparedInput", "main", "build_parser"]

log = logging.getLogger(__name__)

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MEDICAL_SUFFIXES = (".dcm", ".dicom", ".ima", ".nii", ".nii.gz")


@dataclass(frozen=True)
class ReadImage:
    """One image file as read, before anything is adapted to a model.

    Args:
        path: the file or DICOM series folder.
        array: float32 ``(C, i, j[, k])`` intensities in the file's voxel index order.
        spacing: mm per axis ``(i, j[, k])`` from the header, or ``None`` (pictures).
        format: ``"DICOM"``, ``"NIfTI"`` or the picture format (``"PNG"``, ``"JPEG"``, …).
        spacing_origin: where the header's spacing comes from (``"DICOM PixelSpacing"``, …).
        modality: the DICOM Modality (``"CT"``, ``"MR"``, …), else ``None``.
    """

    path: Path
    array: np.ndarray  # (C, i, j[, k]) float32
    spacing: tuple[float, ...] | None
    format: str
    spacing_origin: str | None
    modality: str | None = None

    @property
    def spatial_dims(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return self.array.ndim - 1

    @property
    def is_picture(self) -> bool:
        """A PNG/JPEG/TIFF/BMP picture: display values in [0, 1], no spacing."""
        return self.format not in ("DICOM", "NIfTI")


@dataclass(frozen=True)
class PreparedInput:
    """A file turned into one network input, with the record of how.

    Args:
        path: the file or DICOM series folder.
        x: ``(1, C, *spatial)`` the network input, after the model's intensity transform.
        spacing: mm per axis of ``x`` in the model's layout, or ``None`` when unknown.
        file_spacing: mm per axis ``(i, j[, k])`` of the file as read, or ``None``.
        spacing_source: ``"header: …"`` (e.g. ``"header: DICOM PixelSpacing"``), ``"user: --spacing"`` or ``"none"``.
        steps: what was done to the file, in order, in words (for the report).
        unit: the unit of both spacings (mm; DD for a model that measures in optic-disc diameters).
    """

    path: Path
    x: torch.Tensor  # (1, C, *spatial)
    spacing: tuple[float, ...] | None
    file_spacing: tuple[float, ...] | None
    spacing_source: str
    steps: tuple[str, ...]
    unit: str = "mm"


# -- finding and reading files -------------------------------------------------------------------

def _kind(path: Path) -> str | None:
    """``"picture"``, ``"dicom"``, ``"nifti"`` for a supported file, else ``None``."""
    from mlmi_zoo.training.datasets.medical_io import image_format

    if path.name.lower().endswith(PICTURE_SUFFIXES):
        return "picture"
    try:
        return image_format(path)
    except ValueError:
        return None


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """The images that ``paths`` name: files as given, folders expanded.

    A folder whose image files are all DICOM is one DICOM series (one image). Any other folder
    stands for its image files (sorted by name) and, recursively, its sub-folders; files of other
    types and hidden files inside folders are skipped.

    Args:
        paths: files and folders.

    Returns:
        the image files and DICOM series folders, in order, without duplicates.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no paths, a named file of an unsupported type, or a folder holding no image.
    """
    if not paths:
        raise ValueError("no image files given: name at least one FILE (PNG, DICOM, NIfTI) or folder")
    out: list[Path] = []
    for given in paths:
        p = Path(given)
        if not p.exists():
            raise FileNotFoundError(f"image not found: {str(p)!r}; check the path (relative paths resolve "
                                    f"against {str(Path.cwd())!r})")
        if p.is_dir():
            found = _expand_folder(p)
            if not found:
                raise ValueError(f"folder {str(p)!r} holds no image file: expected PNG/JPEG/TIFF/BMP, DICOM "
                                 f"({', '.join(MEDICAL_SUFFIXES[:3])} or a DICM preamble) or NIfTI (.nii, .nii.gz)")
            out.extend(found)
        elif _kind(p) is None:
            raise ValueError(f"unsupported image file {str(p)!r}: expected PNG/JPEG/TIFF/BMP "
                             f"({', '.join(PICTURE_SUFFIXES)}), DICOM (.dcm, .dicom, .ima, or no extension with a "
                             f"DICM preamble) or NIfTI (.nii, .nii.gz), or a folder of them")
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def _expand_folder(folder: Path) -> list[Path]:
    entries = sorted(q for q in folder.iterdir() if not q.name.startswith("."))
    files = [(q, _kind(q)) for q in entries if q.is_file()]
    images = [(q, k) for q, k in files if k is not None]
    if images and all(k == "dicom" for _, k in images):
        return [folder]  # one DICOM series
    found = [q for q, _ in images]
    for sub in (q for q in entries if q.is_dir()):
        found.extend(_expand_folder(sub))
    return found


def read_file(path: str | Path) -> ReadImage:
    """Read one image file (or DICOM series folder) with the spacing its header states.

    Args:
        path: a PNG/JPEG/TIFF/BMP picture, a DICOM file or series folder, or a NIfTI file.

    Returns:
        a :class:`ReadImage` in the file's voxel index order ``(i, j[, k])``.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the type is not supported, or the file cannot be read as what its name says.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image not found: {str(p)!r}")
    kind = "dicom" if p.is_dir() else _kind(p)
    if kind is None:
        raise ValueError(f"unsupported image file {str(p)!r}: expected PNG/JPEG/TIFF/BMP, DICOM or NIfTI")
    if kind == "picture":
        return _read_picture(p)
    from mlmi_zoo.training.datasets.medical_io import load_image

    what = "DICOM" if kind == "dicom" else "NIfTI"
    try:
        # The header alone first: a damaged file is then reported by the one reader that owns the
        # format, instead of by MONAI after it has tried every reader it knows.
        if kind == "dicom":
            import pydicom

            first = p if p.is_file() else next(q for q in sorted(p.iterdir()) if q.is_file() and _kind(q) == "dicom")
            pydicom.dcmread(first, stop_before_pixels=True)
        else:
            import nibabel

            nibabel.load(p)
        loaded = load_image(p)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # MONAI, pydicom and nibabel raise many unrelated types on a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read {str(p)!r} as {what} ({first.rstrip('.')}); check that the file is complete "
                         f"and is {what} (re-export it from the viewer or PACS)") from err
    array = loaded.array
    spacing = loaded.spacing
    if array.ndim == 4 and array.shape[-1] == 1:  # a series or volume of one slice is a 2D image
        array, spacing = array[..., 0], spacing[:2]
    origin = ("DICOM PixelSpacing" + (" and slice positions" if len(spacing) == 3 else "")
              if kind == "dicom" else "NIfTI affine")
    modality = str(loaded.meta.get("modality") or "") or None
    return ReadImage(path=p, array=array, spacing=spacing, format=what, spacing_origin=origin, modality=modality)


def _read_picture(path: Path) -> ReadImage:
    # PIL rather than MONAI's PILReader: the bit depth (8 or 16) decides the scale to [0, 1], and
    # this is the rule FolderCSVDataset applies to the pictures a model is fine-tuned on.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            fmt = im.format or path.suffix.lstrip(".").upper()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)[None] / 65535.0  # (1, H, W) 16-bit grey
            else:
                im = im.convert("L") if im.mode in ("L", "1", "LA") else im.convert("RGB")
                arr = np.asarray(im, dtype=np.float32) / 255.0
                arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)  # (H, W, 3) -> (3, H, W)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read {str(path)!r} as a picture: {err}; check that the file is a complete "
                         f"PNG/JPEG/TIFF/BMP") from err
    arr = np.ascontiguousarray(np.swapaxes(arr, 1, 2))  # (C, H, W) -> (C, i=column, j=row), as MONAI reads DICOM
    return ReadImage(path=path, array=arr, spacing=None, format=fmt, spacing_origin=None)


# -- parsing the command line's physical values --------------------------------------------------

SPACING_UNITS = ("mm", "DD")  # a length, or optic-disc diameters (fundus photographs, :mod:`mlmi_zoo.units`)


def parse_spacing(text: str | float | Sequence[float | str], unit: str = "mm") -> tuple[float, ...]:
    """Parse a spacing given by a user into ``unit``: one value for every axis, or one per axis.

    Args:
        text: ``0.7``, ``"0.7"``, ``"0.7 mm"``, ``"700 um"``, ``"0.7,0.5"``, ``"0.7 mm, 0.5 mm"`` or a
            sequence of such values. Bare numbers are in ``unit``; units are parsed by pint.
        unit: the unit of the model's spacing: ``"mm"`` (a length), or ``"DD"`` for a model that
            measures in optic-disc diameters (``"0.0019 DD"``, one pixel's size in disc diameters).

    Returns:
        ``unit`` per axis (a 1-tuple for an isotropic spacing).

    Raises:
        ValueError: a value is not of ``unit``'s dimension, not finite, or not positive.
    """
    from mlmi_zoo.units import quantity

    parts: list[float | str] = ([text] if isinstance(text, (int, float)) else
                                [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text))
    values = []
    for part in parts:
        try:
            q = quantity(float(part), unit) if isinstance(part, (int, float)) else quantity(part)
            if q.dimensionless:
                q = quantity(float(q.magnitude), unit)  # bare numbers are in the model's unit
            value = float(q.to(unit).magnitude)
        except Exception as err:  # pint raises several unrelated types (parse, dimensionality)
            kind = "a length" if unit == "mm" else f"a size in {unit}"
            raise ValueError(f"spacing {text!r}: {part!r} is not {kind}; give {unit} as numbers ('0.7') or a "
                             f"value with its unit ('0.7 {unit}'" + (", '700 um'" if unit == "mm" else "")
                             + "), one value or one per axis separated by commas") from err
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"spacing {text!r}: every value must be positive and finite, got {value:g} {unit}; "
                             f"give the pixel size of the image, e.g. '0.7 {unit}'")
        values.append(value)
    if not values or len(values) > 3:
        raise ValueError(f"spacing {text!r}: expected 1 value (all axes) or 2-3 values (one per axis), "
                         f"got {len(values)}")
    return tuple(values)


def _check_spacing_text(text: str | float | Sequence[float | str]) -> None:
    """Refuse a spacing that is neither a length nor a size in another spacing unit (before any model is loaded)."""
    errors = []
    for unit in SPACING_UNITS:
        try:
            parse_spacing(text, unit)
            return
        except ValueError as err:
            errors.append(err)
    raise errors[0]


def spacing_unit(model: InterpretableModel[Any]) -> str:
    """The unit of ``model``'s spacing, as its input spec states it (mm; DD for a measurement bottleneck)."""
    return model.input_spec.spacing_unit


def _center_arg(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not 1 <= len(values) <= 3 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--center {text!r}: expected voxel indices i,j[,k] >= 0, e.g. 64,60")
    return values


def _size_arg(text: str) -> tuple[int, ...]:
    parts = text.replace("x", ",").split(",")
    if not 1 <= len(parts) <= 3 or not all(v.strip().isdigit() and int(v) >= 1 for v in parts):
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected 1 to 3 whole numbers of voxels >= 1, "
                                         f"e.g. 64 or 32,64,64")
    return tuple(int(v) for v in parts)


# -- from a file to a network input --------------------------------------------------------------

def _needs_spacing(model: InterpretableModel[Any]) -> bool:
    """A model that resamples to a canonical spacing or measures in physical units needs the file's."""
    return model.config.spacing is not None or bool(model.config.quantities)


def _fit_axes(values: tuple[float, ...], dims: int, what: str, path: Path) -> tuple[float, ...]:
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise ValueError(f"{what} has {len(values)} values but {str(path)!r} has {dims} spatial axes; "
                         f"give 1 value or {dims}")
    return values


def _to_model_range(img: ReadImage, model: InterpretableModel[Any]) -> tuple[np.ndarray, str]:
    """Raw file intensities -> values the model's intensity transform expects (step 2 of the module doc)."""
    t = model.input_spec.intensity
    arr = img.array
    if t.kind == "window":
        unit = t.unit or "the window's unit"
        if img.is_picture:  # display values are the window's output
            return (t.low + arr * (t.high - t.low)).astype(np.float32), (
                f"picture values [0, 1] taken as the model's window output: [{t.low:g}, {t.high:g}] {unit}")
        note = f"{img.format} values taken as {unit}"
        if img.format == "NIfTI":
            note += " (NIfTI stores no intensity unit)"
        elif img.modality and t.unit == "HU" and img.modality != "CT":
            note += f" although the DICOM modality is {img.modality}, not CT"
        return arr, f"{note}; window [{t.low:g}, {t.high:g}] {unit} -> [0, 1]"
    top = t.high if t.kind == "scale" else 1.0
    if img.is_picture:
        return (arr * top).astype(np.float32), f"picture values [0, 1] scaled to [0, {top:g}]"
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) * top if hi > lo else np.zeros_like(arr)
    return scaled.astype(np.float32), f"{img.format} values [{lo:g}, {hi:g}] rescaled by min/max to [0, {top:g}]"


def _fit_channels(arr: np.ndarray, in_channels: int, path: Path) -> tuple[np.ndarray, str | None]:
    c = arr.shape[0]
    if c == in_channels:
        return arr, None
    if in_channels == 1 and c == 3 and np.array_equal(arr[0], arr[1]) and np.array_equal(arr[0], arr[2]):
        return arr[:1], "colour image with three equal channels read as grey"
    if in_channels == 1 and c == 3:
        raise ValueError(f"{str(path)!r} is a colour image but the model takes greyscale (1 channel); convert it "
                         f"to greyscale first (e.g. PIL: Image.open(f).convert('L').save(g))")
    if in_channels == 3 and c == 1:
        raise ValueError(f"{str(path)!r} is greyscale but the model takes colour (RGB, 3 channels) images; "
                         f"use a model for greyscale images")
    raise ValueError(f"{str(path)!r} has {c} channels (a 4D NIfTI holds one volume per channel) but the model takes "
                     f"{in_channels}; extract the volume to explain first (e.g. nibabel: img.slicer[..., 0])")


def _pick_slice(arr: np.ndarray, spacing: tuple[float, ...] | None, slice_: str | int | None,
                path: Path) -> tuple[np.ndarray, tuple[float, ...] | None, str]:
    depth = arr.shape[-1]
    if slice_ is None:
        raise ValueError(f"{str(path)!r} is a 3D volume {tuple(arr.shape[1:])} but the model is 2D; pass --slice "
                         f"middle (or --slice N, 0 <= N < {depth}) to explain one slice along k")
    k = depth // 2 if slice_ == "middle" else int(slice_)
    if not 0 <= k < depth:
        raise ValueError(f"--slice {slice_}: {str(path)!r} has {depth} slices along k; expected 0 <= N < {depth}")
    return arr[..., k], None if spacing is None else spacing[:2], f"slice k={k} of {depth} taken (3D volume, 2D model)"


def _crop_or_pad(x: torch.Tensor, center: Sequence[float], size: Sequence[int],
                 value: float) -> tuple[torch.Tensor, bool]:
    """(C, *spatial) -> (C, *size) around ``center`` (voxel indices), padding outside with ``value``.

    Returns the cut and whether any of it lies outside ``x`` (was padded).

    By hand because MONAI's SpatialCrop clamps a box that leaves the image (so ``center`` would no
    longer be the centre) and its padding transforms centre the image instead of the box.
    """
    starts = [round(c) - n // 2 for c, n in zip(center, size)]
    pad: list[int] = []
    for start, n, dim in reversed(list(zip(starts, size, x.shape[1:]))):  # F.pad lists the last axis first
        pad += [max(0, -start), max(0, start + n - dim)]
    padded = F.pad(x, pad, mode="constant", value=value)
    index = [slice(None)] + [slice(s + max(0, -s), s + max(0, -s) + n) for s, n in zip(starts, size)]
    return padded[tuple(index)], any(pad)


def prepare_input(model: InterpretableModel[Any], path: str | Path, *, spacing: Any = None,
                  size: Sequence[int] | None = None, center: Sequence[float] | None = None,
                  slice_: str | int | None = None) -> PreparedInput:
    """Read ``path`` and turn it into the input ``model`` expects (steps 1-6 of the module docstring).

    Args:
        model: an image model (``spatial_dims`` 2 or 3).
        path: the file or DICOM series folder.
        spacing: mm per axis ``(i, j[, k])`` for files whose header states none (pictures): a number,
            text such as ``"0.7 mm"`` or one value per axis (see :func:`parse_spacing`).
        size: voxels per axis of the network input, in the model's layout; one value for all axes
            (default: the model's ``img_size``).
        center: voxel indices ``(i, j[, k])`` of the file to centre the input on (default: the
            image's centre); only for models with a canonical spacing.
        slice_: ``"middle"`` or an index along ``k``: the slice of a 3D volume a 2D model explains.

    Returns:
        the :class:`PreparedInput`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read or does not fit the model; the message says what to do.
    """
    spec = model.input_spec
    dims = spec.spatial_dims
    img = read_file(path)
    p = img.path
    axes = "(i, j, k)" if img.spatial_dims == 3 else "(i, j)"
    steps = [f"read {img.format} {tuple(img.array.shape[1:])} {axes}, {img.array.shape[0]} channel(s)"]

    # spacing: the header's, else the user's, else none
    file_spacing: tuple[float, ...] | None
    if img.spacing is not None:
        file_spacing, source = img.spacing, f"header: {img.spacing_origin}"
        if spacing is not None:
            steps.append("--spacing ignored: the header states the spacing")
    elif spacing is not None:
        file_spacing = _fit_axes(parse_spacing(spacing, spacing_unit(model)), img.spatial_dims, "--spacing", p)
        source = "user: --spacing"
    else:
        file_spacing, source = None, "none"
    if file_spacing is None and _needs_spacing(model):
        unit = spacing_unit(model)
        example = "0.7" if unit == "mm" else f"{min(spec.spacing or (1.0,)):.3g}"
        raise ValueError(f"{str(p)!r} ({img.format}) states no pixel spacing and the model measures in {unit} at a "
                         f"known scale; give it with --spacing, e.g. --spacing {example} or --spacing '{example} {unit}'"
                         + ("" if unit == "mm" else f" (the size of one pixel of this file in {unit}: for optic-disc "
                            "diameters, 1 / the disc's diameter in pixels)"))

    arr, intensity_note = _to_model_range(img, model)
    arr, channel_note = _fit_channels(arr, spec.in_channels, p)
    steps += [n for n in (channel_note,) if n]
    if img.spatial_dims == 3 and dims == 2:
        arr, file_spacing, note = _pick_slice(arr, file_spacing, slice_, p)
        steps.append(note)
    elif img.spatial_dims == 2 and dims == 3:
        raise ValueError(f"{str(p)!r} is a 2D image {tuple(arr.shape[1:])} but the model is 3D; give a 3D volume "
                         f"(a DICOM series folder or a 3D NIfTI file) or use a 2D model")
    here = arr.ndim - 1

    # reverse (i, j[, k]) into the model's (row, column) / (slice, row, column)
    x = torch.from_numpy(np.ascontiguousarray(arr))  # (C, i, j[, k])
    x = x.permute(0, *range(here, 0, -1))  # (C, [k,] j, i)
    model_spacing = None if file_spacing is None else tuple(reversed(file_spacing))
    out_size = tuple(int(s) for s in _fit_axes(tuple(float(s) for s in (size or spec.size)), here, "--size", p))
    if spec.spacing is not None:
        assert model_spacing is not None  # _needs_spacing refused files without one
        c_file = None if center is None else _fit_axes(tuple(float(c) for c in center), here, "--center", p)
        x, model_spacing = _resample_and_cut(x, model_spacing, spec, out_size, c_file, p, steps, spacing_unit(model))
    else:
        if center is not None:
            raise ValueError("--center needs a model with a canonical spacing; this model sees whole images "
                             f"resized to {spec.size}: leave --center out")
        x, model_spacing = _resize_whole(x, model_spacing, out_size, steps)
    steps.append(f"intensities: {intensity_note}")
    net = spec.intensity(x.float().unsqueeze(0))  # (1, C, *size)
    return PreparedInput(path=p, x=net, spacing=model_spacing, file_spacing=file_spacing,
                         spacing_source=source, steps=tuple(steps), unit=spacing_unit(model))


def _resample_and_cut(x: torch.Tensor, spacing: tuple[float, ...], spec: InputSpec, size: tuple[int, ...],
                      center_file: tuple[float, ...] | None, path: Path,
                      steps: list[str], unit: str = "mm") -> tuple[torch.Tensor, tuple[float, ...]]:
    """(C, *spatial) at ``spacing`` -> (C, *size) at the model's spacing around the centre (step 6)."""
    assert spec.spacing is not None  # the caller's branch
    if center_file is None:
        center = [(n - 1) / 2 for n in x.shape[1:]]
    else:
        shape_file = tuple(reversed(x.shape[1:]))
        if not all(0 <= c <= n - 1 for c, n in zip(center_file, shape_file)):
            raise ValueError(f"--center {','.join(f'{c:g}' for c in center_file)} lies outside {str(path)!r}, whose "
                             f"voxel indices (i, j[, k]) run from 0 to {tuple(n - 1 for n in shape_file)}")
        center = list(reversed(center_file))
        steps.append(f"centred on voxel {','.join(f'{c:g}' for c in center_file)} (i, j[, k]) of the file (--center)")
    x, center = _resample_around(x, spacing, spec.spacing, size, center)
    if not np.allclose(spacing, spec.spacing, rtol=1e-4):
        steps.append(f"resampled from {_mm(spacing, unit)} to the model's {_mm(spec.spacing, unit)}")
    t = spec.intensity
    pad_value = t.low if t.kind == "window" else 0.0  # what the intensity transform maps to 0
    x, padded = _crop_or_pad(x, center, size, pad_value)
    steps.append(f"cut {size} voxels around the centre"
                 + (f"; the part outside the image filled with {pad_value:g}" if padded else ""))
    return x, tuple(float(s) for s in spec.spacing)


def _resize_whole(x: torch.Tensor, spacing: tuple[float, ...] | None, size: tuple[int, ...],
                  steps: list[str]) -> tuple[torch.Tensor, tuple[float, ...] | None]:
    """(C, *spatial) -> (C, *size), the whole image, for models without a canonical spacing (step 6)."""
    from monai.data.meta_tensor import MetaTensor
    from monai.transforms.spatial.array import Resize

    before = tuple(x.shape[1:])
    resized = Resize(spatial_size=size, mode="bilinear" if len(size) == 2 else "trilinear", anti_aliasing=True)(x)
    # MONAI annotates a Tensor or an ndarray; a tensor in gives a MetaTensor out
    out = resized.as_tensor() if isinstance(resized, MetaTensor) else torch.as_tensor(resized)
    steps.append(f"whole image resized from {before} to {size} (the model has no canonical spacing)")
    if spacing is None:
        return out.float(), None
    return out.float(), tuple(s * n / m for s, n, m in zip(spacing, before, size))


def _resample_around(x: torch.Tensor, spacing: Sequence[float], target: Sequence[float], size: Sequence[int],
                     center: Sequence[float]) -> tuple[torch.Tensor, list[float]]:
    """Resample the part of ``x`` (C, *spatial) that ``size`` voxels at ``target`` around ``center`` need.

    Only that part is resampled (plus a two-voxel margin for interpolation): resampling a whole
    512 x 512 x 300 CT volume to cut 32³ voxels from it would take gigabytes and seconds.

    Returns:
        the resampled part and ``center`` in its voxel indices.
    """
    from mlmi_zoo.training.datasets.medical_io import resample_to_spacing

    lo, hi = [], []
    for c, n, s, t, dim in zip(center, size, spacing, target, x.shape[1:]):
        half = n * t / s / 2 + 2
        lo.append(max(0, math.floor(c - half)))
        hi.append(min(dim, math.ceil(c + half) + 1))
    part = x[(slice(None), *(slice(a, b) for a, b in zip(lo, hi)))]  # (C, *part)
    resampled = resample_to_spacing(part, tuple(spacing), tuple(target))  # (C, *resampled)
    # MONAI's Spacing keeps voxel 0 at the origin: index n at spacing s lies at n s / t at spacing t
    return resampled, [(c - a) * s / t for c, a, s, t in zip(center, lo, spacing, target)]


def _mm(values: Sequence[float] | None, unit: str = "mm") -> str:
    return "unknown" if values is None else " x ".join(f"{v:.4g}" for v in values) + f" {unit}"


# -- explaining and reporting --------------------------------------------------------------------

def measurements_of(exp: Explanation) -> dict[str, Measurement]:
    """What an explanation measured in physical units, for its first case.

    Args:
        exp: an explanation.

    Returns:
        the physical head's measurements and the concepts measured in a unit (concept bottlenecks:
        ``diameter_mm``, ``mean_hu``), name -> :class:`~mlmi_zoo.specs.Measurement`.
    """
    found = dict(exp.measurements)
    concepts = getattr(exp, "concepts", None)
    if isinstance(concepts, dict):
        found.update({k: v for k, v in concepts.items() if isinstance(v, Measurement) and k not in found})
    return found


def _decision(exp: Explanation) -> tuple[str, float]:
    probs = exp.probabilities()[0]  # (C,)
    c = int(probs.argmax())
    names = exp.label_names or tuple(str(i) for i in range(probs.numel()))
    return names[c], float(probs[c])


def summary_line(prepared: PreparedInput, exp: Explanation) -> str:
    """One line for a file: its name, the predicted label with probability, each measurement with unit.

    Args:
        prepared: the file's prepared input.
        exp: its explanation.

    Returns:
        e.g. ``CT_small.dcm: malignant (p=0.954); diameter_mm 48.23 mm; spacing 0.6615 x 0.6615 mm
        (header: DICOM PixelSpacing)`` (on one line).
    """
    label, prob = _decision(exp)
    parts = [f"{prepared.path.name}: {label} (p={prob:.3f})"]
    parts += [f"{name} {_value(m)} {m.unit}" for name, m in measurements_of(exp).items()]
    parts.append(f"spacing {_mm(prepared.file_spacing, prepared.unit)} ({prepared.spacing_source})" if prepared.file_spacing
                 else "spacing unknown")
    return "; ".join(parts)


def _value(m: Measurement) -> str:
    v = m.value
    return f"{float(v.reshape(-1)[0]) if isinstance(v, torch.Tensor) else float(v):.4g}"


def _file_section(index: int, prepared: PreparedInput, exp: Explanation) -> str:
    label, prob = _decision(exp)
    rows: list[tuple[Any, ...]] = [
        ("file", str(prepared.path)),
        ("spacing of the file", f"{_mm(prepared.file_spacing, prepared.unit)} (i, j[, k])"),
        ("spacing from", prepared.spacing_source),
        ("spacing of the network input", f"{_mm(prepared.spacing, prepared.unit)} (model layout: [slice,] row, column)"),
        ("prediction", f"{label} (p={prob:.3f})"),
    ]
    rows += [(f"measurement: {name}", f"{_value(m)} {m.unit}") for name, m in measurements_of(exp).items()]
    parts = [f'<h2 id="file-{index}">{html.escape(prepared.path.name)}</h2>',
             html_table(("", ""), rows),
             "<h3>From the file to the network input</h3><ol>"
             + "".join(f"<li>{html.escape(s)}</li>" for s in prepared.steps) + "</ol>"]
    for title, content in exp.html_sections(0):
        parts.append(f"<h3>{html.escape(title)}</h3>\n{content}")
    return "\n".join(parts)


def _explain_all(model_uri: str, paths: Sequence[str | Path], out: str | Path, *, spacing: Any = None,
                 size: Sequence[int] | None = None, center: Sequence[float] | None = None,
                 slice_: str | int | None = None) -> list[tuple[PreparedInput, Explanation]]:
    import mlmi_zoo
    from mlmi_zoo._weights import write_text_atomic

    if spacing is not None:
        _check_spacing_text(spacing)  # refuse a bad value before the model is loaded
    files = expand_paths(paths)
    model = mlmi_zoo.load(model_uri).eval()
    dims = model.input_spec.spatial_dims
    if dims not in (2, 3):
        raise ValueError(f"model {model_uri!r} takes bags of feature vectors, not image files; use an image model "
                         f"(see `mlmi-zoo list --pretrained`)")
    if slice_ is not None and dims != 2:
        raise ValueError(f"--slice picks one slice for a 2D model; {model_uri!r} is 3D: leave --slice out")
    if size is not None and len(size) not in (1, dims):
        raise ValueError(f"--size {tuple(size)}: expected 1 value or {dims} (one per axis of the {dims}D model)")
    done = []
    for path in files:
        prepared = prepare_input(model, path, spacing=spacing, size=size, center=center, slice_=slice_)
        x = prepared.x.to(next(model.parameters()).dtype)
        exp = model.explain(x, spacing=list(prepared.spacing)) if prepared.spacing is not None else model.explain(x)
        done.append((prepared, exp))
    toc = "".join(f'<li><a href="#file-{i}">{html.escape(p.path.name)}</a></li>' for i, (p, _) in enumerate(done))
    spec = model.input_spec
    head = html_table(("", ""), [
        ("model", model_uri),
        ("model class", type(model).__name__),
        ("input", f"{spec.in_channels} channel(s), {dims}D, size {spec.size}, canonical spacing {_mm(spec.spacing, spacing_unit(model))}"),
        ("files", str(len(done))),
    ])
    body = head + f"<ul>{toc}</ul>\n" + "\n".join(_file_section(i, p, e) for i, (p, e) in enumerate(done))
    write_text_atomic(out, render_page(f"mlmi-zoo explain: {model_uri}", body))
    return done


def explain_files(model_uri: str, paths: Sequence[str | Path], out: str | Path, *, spacing: Any = None,
                  size: Sequence[int] | None = None, center: Sequence[float] | None = None,
                  slice_: str | int | None = None) -> list[Explanation]:
    """Explain image files with a zoo model and write one HTML report of them all.

    Args:
        model_uri: bundled name (``protopnet_resnet8.lidc_nodule``), ``local-dir:PATH`` or ``hf-hub:ORG/REPO``.
        paths: image files and folders (see :func:`expand_paths`).
        out: the HTML report to write (atomically: a temporary file renamed over it).
        spacing: mm per axis ``(i, j[, k])`` of files whose header states none (see :func:`parse_spacing`).
        size: voxels per axis of the network input (default: the model's input size).
        center: voxel indices ``(i, j[, k])`` of each file to centre the input on (default: its centre).
        slice_: ``"middle"`` or an index along ``k``, for 3D volumes explained by a 2D model.

    Returns:
        one explanation (batch of one) per image, in the order of :func:`expand_paths`.

    Raises:
        FileNotFoundError: a file or the model does not exist.
        ValueError: a file cannot be read or does not fit the model, or a bad option value.
    """
    return [exp for _, exp in _explain_all(model_uri, paths, out, spacing=spacing, size=size, center=center,
                                           slice_=slice_)]


# -- command line --------------------------------------------------------------------------------

def _spacing_arg(text: str) -> str:
    try:
        _check_spacing_text(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _slice_arg(text: str) -> str | int:
    if text == "middle":
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"--slice {text!r}: expected 'middle' or a slice index N >= 0")


def build_parser() -> _Parser:
    """The ``explain`` argument parser."""
    p = _Parser(prog="mlmi-zoo explain",
                description="Explain image files (PNG/JPEG, DICOM file or series folder, NIfTI, or folders of them) "
                            "with a zoo model: one HTML report of all files, one line per file on stdout. The spacing "
                            "is read from DICOM/NIfTI headers; files are resampled to the model's canonical spacing "
                            "so measurements come out in mm.")
    p.add_argument("model", metavar="MODEL", help="bundled name (see `mlmi-zoo list --pretrained`), local-dir:PATH "
                   "or hf-hub:ORG/REPO[@REV]")
    p.add_argument("files", metavar="FILE", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--out", type=Path, required=True, help="HTML report to write")
    p.add_argument("--spacing", type=_spacing_arg, help="pixel spacing of files without one in their header "
                   "(PNG/JPEG): '0.7' (mm), '0.7 mm', '700 um', or one value per axis i,j[,k] ('0.7,0.5')")
    p.add_argument("--size", type=_size_arg, help="voxels of the network input per axis "
                   "(model layout), one value or one per axis (default: the model's input size)")
    p.add_argument("--center", type=_center_arg, metavar="I,J[,K]",
                   help="voxel indices of the file to centre the input on (default: the image centre)")
    p.add_argument("--slice", dest="slice_", type=_slice_arg, metavar="middle|N",
                   help="explain one slice along k of a 3D volume with a 2D model (refused otherwise)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``explain``; ``argv[0]`` may be the word ``explain`` (as the top-level CLI passes it).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0, or 2 after a one-line error on stderr (bad arguments, unreadable files, unknown model).
    """
    from mlmi_zoo._config import OverrideError
    from mlmi_zoo._weights import WeightsError

    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "explain":
        args_list = args_list[1:]
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as stop:  # argparse has printed --help or its one-line error; return its status
        return stop.code if isinstance(stop.code, int) else 2
    try:
        done = _explain_all(args.model, args.files, args.out, spacing=args.spacing, size=args.size,
                            center=args.center, slice_=args.slice_)
    except (ValueError, FileNotFoundError, KeyError, OverrideError, WeightsError) as err:
        print(f"mlmi-zoo explain: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for prepared, exp in done:
        print(summary_line(prepared, exp))
    log.info("report of %d file(s) written to %s", len(done), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reading DICOM and NIfTI images with their physical spacing, and resampling to a target spacing.

Formats: DICOM (PS3.10 files; a single file or a folder holding one series) and NIfTI-1/NIfTI-2
(``.nii``, ``.nii.gz``). Reading is delegated to MONAI's readers (``PydicomReader``,
``NibabelReader`` through ``monai.transforms.LoadImage``); resampling to MONAI's ``Spacing``. What we
add: one frozen :class:`LoadedImage` with the spacing in mm per array axis, the orientation code and a
small JSON-friendly metadata dict; checks that refuse missing files, unknown extensions and
non-positive spacings with messages that say what to do.

Conventions (MONAI's, shared by both formats):
    * arrays are channel-first ``(C, *spatial)`` and the spatial axes follow the voxel index order
      ``(i, j[, k])`` of the affine. For DICOM, MONAI swaps the first two axes so that ``i`` runs
      along the columns: a 2D DICOM slice arrives as ``(1, columns, rows)``, i.e. transposed with
      respect to ``pydicom``'s ``pixel_array``; ``spacing`` follows the array axes.
    * DICOM intensities are rescaled with ``RescaleSlope`` / ``RescaleIntercept`` (MONAI's
      ``PydicomReader`` applies them), so CT arrives in Hounsfield units.
    * the affine is in RAS world coordinates (MONAI converts DICOM's LPS).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, cast

import numpy as np
import torch

logger = logging.getLogger(__name__)

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


@dataclass(frozen=True)
class LoadedImage:
    """An image read from disk with its physical geometry.

    Args:
        array: float32 ``(C, *spatial)`` intensities (HU for CT).
        spacing: voxel size in mm per spatial axis of ``array`` (``len(spacing) == array.ndim - 1``).
        orientation: axis codes of the affine in RAS world coordinates, e.g. ``"RAS"`` or ``"LPS"``
            (``"LA"``-style two-letter codes for 2D images).
        meta: small JSON-friendly metadata: ``format``, ``path``, ``affine`` (4x4 list),
            for DICOM ``modality``, ``rescale_slope``, ``rescale_intercept``, ``slice_thickness_mm``.
    """

    array: np.ndarray  # (C, *spatial) float32
    spacing: tuple[float, ...]
    orientation: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return len(self.spacing)


def image_format(path: str | Path) -> Literal["dicom", "nifti"]:
    """Return the format a path is read as: ``"dicom"`` or ``"nifti"``.

    Args:
        path: a ``.dcm`` file, a DICOM series folder, or a ``.nii`` / ``.nii.gz`` file. Files
            without an extension are accepted when they carry the DICOM ``DICM`` preamble.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the extension is not a supported one.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image not found: {str(p)!r}; check the path (relative paths resolve against {str(Path.cwd())!r})")
    if p.is_dir():
        return "dicom"
    name = p.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(_DICOM_SUFFIXES) or (p.suffix == "" and _has_dicom_preamble(p)):
        return "dicom"
    raise ValueError(
        f"unsupported image file {str(p)!r}: expected a DICOM file ({', '.join(_DICOM_SUFFIXES)} or no extension "
        f"with a DICM preamble), a DICOM series folder, or NIfTI ({', '.join(_NIFTI_SUFFIXES)}); "
        f"convert other formats first (PNG/JPEG are read by FolderCSVDataset without spacing)"
    )


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def load_image(path: str | Path) -> LoadedImage:
    """Read a DICOM file, a DICOM series folder, or a NIfTI file with its spacing in mm.

    Args:
        path: file or folder to read (see :func:`image_format`).

    Returns:
        A :class:`LoadedImage` with a channel-first float32 array, spacing per spatial array axis in mm,
        the orientation code and metadata.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unsupported extension, or the header states a non-positive / non-finite spacing.
    """
    fmt = image_format(path)
    # MONAI is imported here so that importing the data sets stays fast and MONAI stays optional
    # for users who only read MedMNIST or cached features.
    from monai.data.image_reader import NibabelReader, PydicomReader
    from monai.data.meta_tensor import MetaTensor
    from monai.transforms.io.array import LoadImage

    reader = PydicomReader() if fmt == "dicom" else NibabelReader()
    loader = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=np.float32)
    # MONAI annotates the (image, metadata) pair of image_only=False too; image_only=True returns the image alone
    img = cast(MetaTensor, loader(str(path)))  # (C, *spatial)
    affine = np.asarray(img.affine, dtype=np.float64)
    spatial_dims = img.ndim - 1
    # column norms of the affine = voxel sizes along each array axis (what MONAI calls pixdim)
    spacing = tuple(float(np.linalg.norm(affine[:3, a])) for a in range(spatial_dims))
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(
            f"{str(path)!r}: header gives spacing {spacing} mm; every voxel size must be finite and positive. "
            f"Fix the header (e.g. PixelSpacing / pixdim) before using the image for physical measurements"
        )
    orientation = _orientation_code(affine, spatial_dims)
    meta: dict[str, Any] = {
        "format": fmt,
        "path": str(path),
        "affine": affine.tolist(),
        "space": str(img.meta.get("space", "RAS")),
    }
    if fmt == "dicom":
        meta.update(_dicom_meta(path))
    array = img.detach().cpu().numpy().astype(np.float32, copy=False)
    return LoadedImage(array=array, spacing=spacing, orientation=orientation, meta=meta)


def _orientation_code(affine: np.ndarray, spatial_dims: int) -> str:
    import nibabel.orientations as nio

    codes = nio.aff2axcodes(affine)
    return "".join(c or "?" for c in codes[:spatial_dims])


def _dicom_meta(path: str | Path) -> dict[str, Any]:
    """Header values a reader of the loaded image needs to trust its intensities and geometry."""
    import pydicom

    p = Path(path)
    first = p if p.is_file() else next(q for q in sorted(p.iterdir()) if q.is_file() and _is_dicom(q))
    ds = pydicom.dcmread(first, stop_before_pixels=True)

    def num(key: str) -> float | None:
        value = ds.get(key)
        return None if value is None or value == "" else float(value)

    return {
        "modality": str(ds.get("Modality", "")),
        # MONAI's PydicomReader applied these: array = stored value * slope + intercept
        "rescale_slope": num("RescaleSlope"),
        "rescale_intercept": num("RescaleIntercept"),
        "slice_thickness_mm": num("SliceThickness"),
        "pixel_spacing_mm": [float(v) for v in ds.PixelSpacing] if "PixelSpacing" in ds else None,
    }


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() in _DICOM_SUFFIXES or _has_dicom_preamble(path)


def _check_spacing(spacing: Sequence[float] | torch.Tensor, spatial_dims: int, what: str) -> tuple[float, ...]:
    values = tuple(float(s) for s in (spacing if isinstance(spacing, (list, tuple)) else np.asarray(spacing).reshape(-1)))
    if len(values) != spatial_dims:
        raise ValueError(f"{what} must have {spatial_dims} values (mm per spatial axis), got {values}")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"{what} must be finite and positive (mm), got {values}")
    return values


def resample_to_spacing(
    image: torch.Tensor | np.ndarray,
    spacing: Sequence[float] | torch.Tensor,
    target_spacing: Sequence[float] | torch.Tensor,
    mode: Literal["bilinear", "nearest"] = "bilinear",
) -> torch.Tensor:
    """Resample a channel-first image from ``spacing`` to ``target_spacing`` (both in mm per axis).

    This is how models see physical scale: after resampling, one pixel is ``target_spacing`` mm.
    Uses MONAI's ``Spacing`` with an axis-aligned affine ``diag(spacing)``; the field of view is kept
    (the output covers the same extent as the input voxel centres).

    Args:
        image: ``(C, H, W)`` or ``(C, D, H, W)`` tensor or array.
        spacing: current voxel size in mm, one value per spatial axis.
        target_spacing: wanted voxel size in mm, one value per spatial axis.
        mode: ``"bilinear"`` for intensities (trilinear in 3D), ``"nearest"`` for masks and labels.

    Returns:
        float32 tensor ``(C, *new_spatial)`` (masks keep their values under ``"nearest"``).

    Raises:
        ValueError: wrong number of dimensions or spacing values, non-positive spacing, unknown mode.
    """
    x = torch.as_tensor(image)
    if x.ndim not in (3, 4):
        raise ValueError(
            f"expected a channel-first image (C, H, W) or (C, D, H, W), got shape {tuple(x.shape)}; "
            f"add a channel axis with x[None]"
        )
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    spatial_dims = x.ndim - 1
    src = _check_spacing(spacing, spatial_dims, "spacing")
    dst = _check_spacing(target_spacing, spatial_dims, "target_spacing")
    from monai.data.meta_tensor import MetaTensor
    from monai.transforms.spatial.array import Spacing

    affine = torch.eye(4, dtype=torch.float64)
    affine[range(spatial_dims), range(spatial_dims)] = torch.tensor(src, dtype=torch.float64)
    meta_img = MetaTensor(x.float(), affine=affine)
    # MONAI computes in the torch dtype of any numpy or torch dtype given, here torch.float32
    resample = Spacing(pixdim=dst, mode=mode, padding_mode="border", dtype=np.float32)
    # MONAI annotates a Tensor; a MetaTensor in gives a MetaTensor out (with the new affine)
    out = cast(MetaTensor, resample(meta_img))
    return out.as_tensor().float()

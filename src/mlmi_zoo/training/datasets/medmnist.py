"""MedMNIST v2 / MedMNIST+ from the official ``.npz`` files, checksum-verified, never downloaded.

Data: Yang et al., "MedMNIST v2 — A large-scale lightweight benchmark for 2D and 3D biomedical image
classification", Scientific Data 10, 41 (2023); MedMNIST+ adds 64/128/224 (2D) and 64 (3D) sizes.
Licence CC BY 4.0; cite the source data set of each flag as well (e.g. Kermany et al. 2018 for
PneumoniaMNIST).

What we changed with respect to the ``medmnist`` package: no download code at all (files are read
from a directory the user points to), the MD5 check is cached per file state, every failure names the
file, and samples are the library's dicts. MedMNIST images were *resized* from their originals
(28 px or 28³ voxels regardless of the original field of view), so they carry **no physical spacing**:
samples have no ``"spacing"`` key and :attr:`MedMNIST.spacing` is ``None``. Physical-unit heads
cannot be trained on them. ``upsample_to`` enlarges 2D images by bilinear interpolation (for
backbones that down-sample 32-fold); it adds no detail: a MedMNIST+ file of that size, resized from
the originals, is the better input where one is at hand.
"""
from __future__ import annotations

import hashlib
import logging
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch.nn import functional as F

from mlmi_zoo.training.data_spec import SizedDataset
from mlmi_zoo.training.datasets._location import data_file

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
Task = Literal["binary-class", "multi-class", "ordinal-regression", "multi-label, binary-class"]


@dataclass(frozen=True)
class MedMNISTInfo:
    """What the library knows about one MedMNIST flag (from the MedMNIST v2 paper, Table 1)."""

    task: Task
    in_channels: int
    spatial_dims: int
    label_names: tuple[str, ...]


_ORGAN = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
          "lung-left", "lung-right", "pancreas", "spleen")

INFO: dict[str, MedMNISTInfo] = {
    "pathmnist": MedMNISTInfo("multi-class", 3, 2, (
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
        "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium")),
    "chestmnist": MedMNISTInfo("multi-label, binary-class", 1, 2, (
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
        "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia")),
    "dermamnist": MedMNISTInfo("multi-class", 3, 2, (
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions")),
    "octmnist": MedMNISTInfo("multi-class", 1, 2, (
        "choroidal neovascularization", "diabetic macular edema", "drusen", "normal")),
    "pneumoniamnist": MedMNISTInfo("binary-class", 1, 2, ("normal", "pneumonia")),
    "retinamnist": MedMNISTInfo("ordinal-regression", 3, 2, ("0", "1", "2", "3", "4")),
    "breastmnist": MedMNISTInfo("binary-class", 1, 2, ("malignant", "normal, benign")),
    "bloodmnist": MedMNISTInfo("multi-class", 3, 2, (
        "basophil", "eosinophil", "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
        "neutrophil", "platelet")),
    "tissuemnist": MedMNISTInfo("multi-class", 1, 2, (
        "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
        "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
        "Thick Ascending Limb")),
    "organamnist": MedMNISTInfo("multi-class", 1, 2, _ORGAN),
    "organcmnist": MedMNISTInfo("multi-class", 1, 2, _ORGAN),
    "organsmnist": MedMNISTInfo("multi-class", 1, 2, _ORGAN),
    "organmnist3d": MedMNISTInfo("multi-class", 1, 3, _ORGAN),
    "nodulemnist3d": MedMNISTInfo("binary-class", 1, 3, ("benign", "malignant")),
    "adrenalmnist3d": MedMNISTInfo("binary-class", 1, 3, ("normal", "hyperplasia")),
    "fracturemnist3d": MedMNISTInfo("multi-class", 1, 3, (
        "buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture")),
    "vesselmnist3d": MedMNISTInfo("binary-class", 1, 3, ("vessel", "aneurysm")),
    "synapsemnist3d": MedMNISTInfo("binary-class", 1, 3, ("inhibitory synapse", "excitatory synapse")),
}

# Official MD5s (the ``medmnist`` package's info.py) of the files we have verified. Other files are
# read with ``verify=False`` or ``verify="<md5>"``.
MD5: dict[str, str] = {
    "pneumoniamnist.npz": "28209eda62fecd6e6a2d98b1501bb15f",
    "retinamnist.npz": "bd4c0672f1bba3e3a89f0e4e876791e4",
    "adrenalmnist3d.npz": "bbd3c5a5576322bc4cdfea780653b1ce",
    "adrenalmnist3d_64.npz": "17721accfe9fb005146a47d33bc54b2f",
    "vesselmnist3d.npz": "b41fd4f7e7e2feedddb201585ecafa1b",
}

# (resolved path, mtime_ns, size) -> md5 hex digest; files are re-hashed only when they change.
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def file_md5(path: str | Path) -> str:
    """MD5 hex digest of a file, cached per (path, modification time, size)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size)
    if key not in _MD5_CACHE:
        h = hashlib.md5()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _MD5_CACHE[key] = h.hexdigest()
    return _MD5_CACHE[key]


def _file_name(flag: str, size: int | None) -> str:
    return f"{flag}.npz" if size in (None, 28) else f"{flag}_{size}.npz"


def resolve_file(path_or_dir: str | Path | None, flag: str | None, size: int | None) -> Path:
    """Find the ``.npz`` file for ``flag`` at ``size``; never downloads.

    Args:
        path_or_dir: an ``.npz`` file, a directory holding it, or ``None`` for ``$MLMI_ZOO_DATA``.
        flag: e.g. ``"pneumoniamnist"``; needed unless ``path_or_dir`` is a file.
        size: image side (28, 64, 128, 224); ``None`` means 28.

    Raises:
        FileNotFoundError: no such file, or no folder given (a
            :class:`~mlmi_zoo.training.datasets._location.DataNotFoundError` saying where we looked).
        ValueError: neither a file nor a flag given.
    """
    if path_or_dir is not None and Path(path_or_dir).suffix == ".npz":
        p = Path(path_or_dir)
        if not p.is_file():
            raise FileNotFoundError(f"MedMNIST file not found: {str(p)!r}")
        return p
    if flag is None:
        raise ValueError("give either the path of a MedMNIST .npz file or a directory plus flag= (e.g. 'pneumoniamnist')")
    return data_file(_file_name(flag, size), path_or_dir, argument="path_or_dir",
                     hint="Download it from https://zenodo.org/records/10519652 (MedMNIST v2); "
                          "this library never downloads data")


def _parse_name(path: Path) -> tuple[str, int]:
    m = re.fullmatch(r"([a-z0-9]+?)(?:_(\d+))?", path.stem.lower())
    if m is None:
        return path.stem, 28
    return m.group(1), int(m.group(2) or 28)


class MedMNIST(SizedDataset[dict[str, Any]]):
    """One split of a MedMNIST file as a torch ``Dataset`` of sample dicts.

    Each sample: ``{"image": float32 (C, H, W) or (C, D, H, W) in [0, 1], "label": int64 scalar,
    "concepts": {}, "measurements": {}, "index": int}`` — no ``"spacing"``: the images were resized,
    their pixel size in mm is unknown.

    Args:
        path_or_dir: an ``.npz`` file, a directory holding ``{flag}[_{size}].npz``, or ``None`` for the
            directory named by ``$MLMI_ZOO_DATA``.
        flag: MedMNIST flag, e.g. ``"pneumoniamnist"``; taken from the file name when a file is given.
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: image side of MedMNIST+ files (28, 64, 128, 224); ``None`` means 28 or the file's own.
        verify: ``True`` checks the official MD5 (unknown files are refused), a 32-hex string checks
            that MD5, ``False`` skips the check.
        upsample_to: return 2D images of ``upsample_to`` x ``upsample_to`` pixels, bilinearly
            interpolated from the file's (``None``: as stored); at least the file's size.
        transform: optional callable applied to each sample dict (augmentation).

    Attributes:
        label_names, task, spatial_dims, in_channels, flag, path, spacing (always ``None``).

    Raises:
        FileNotFoundError: file not found, or neither ``path_or_dir`` nor ``$MLMI_ZOO_DATA`` given.
        ValueError: checksum mismatch (expected and actual MD5), corrupt or truncated file, missing keys,
            labels outside the known classes, an unknown flag with ``verify=True``, an ``upsample_to``
            smaller than the file's images or asked of 3D volumes.
    """

    spacing = None  # resized images: no physical pixel size

    def __init__(
        self,
        path_or_dir: str | Path | None = None,
        flag: str | None = None,
        split: str = "train",
        size: int | None = None,
        verify: bool | str = True,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        upsample_to: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.path = resolve_file(path_or_dir, flag, size)
        file_flag, file_size = _parse_name(self.path)
        self.flag = flag or file_flag
        if size is not None and size != file_size:
            raise ValueError(f"{self.path} holds {file_size}-pixel images but size={size} was asked; pass the matching file")
        self.size = file_size
        self.split = split
        self.transform = transform
        self._verify(verify)

        images, labels = self._read_arrays()
        info = INFO.get(self.flag)
        if info is not None and info.task.startswith("multi-label"):
            raise ValueError(
                f"{self.flag} is multi-label ({len(info.label_names)} binary labels per image); samples in this "
                f"library carry one class label, so multi-label flags are not supported"
            )
        self.spatial_dims, self.in_channels = self._layout(images, info)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{self.path}: expected {split}_labels of shape ({images.shape[0]}, 1), got {labels.shape}"
            )
        labels = labels.astype(np.int64)
        if info is not None:
            self.label_names = info.label_names
            self.task: Task = info.task
        else:
            n = int(labels.max()) + 1 if labels.size else 0
            self.label_names = tuple(str(i) for i in range(n))
            self.task = "binary-class" if n <= 2 else "multi-class"
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise ValueError(
                f"{self.path}: {split}_labels span [{labels.min()}, {labels.max()}] but {self.flag} has "
                f"{len(self.label_names)} classes {self.label_names}"
            )
        self.images = images  # uint8 as stored; scaled per item to keep 64^3 volumes small in memory
        self.labels = labels
        if upsample_to is not None and (self.spatial_dims != 2 or upsample_to < images.shape[1]):
            raise ValueError(f"upsample_to={upsample_to!r}: expected an image side >= {images.shape[1]} "
                             f"(the file's) for 2D images; {self.flag} holds {self.spatial_dims}D images")
        self.upsample_to = upsample_to

    # -- loading ---------------------------------------------------------------------------------
    def _verify(self, verify: bool | str) -> None:
        if verify is False:
            return
        if isinstance(verify, str):
            expected = verify.lower()
            if not re.fullmatch(r"[0-9a-f]{32}", expected):
                raise ValueError(f"verify must be True, False or a 32-hex-digit MD5, got {verify!r}")
        else:
            expected = MD5.get(self.path.name)
            if expected is None:
                raise ValueError(
                    f"{self.path}: no official MD5 known for {self.path.name!r} (known: {sorted(MD5)}); pass "
                    f"verify='<md5 from medmnist info.py>' to check it, or verify=False to read it unchecked"
                )
        actual = file_md5(self.path)
        if actual != expected:
            raise ValueError(
                f"{self.path}: MD5 mismatch, expected {expected}, got {actual}; the file is corrupt or not the "
                f"official release — download it again (or pass verify=False if you changed it on purpose)"
            )

    def _read_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        keys = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                found = list(npz.files)
                missing = [k for k in keys if k not in found]
                if not missing:
                    return np.asarray(npz[f"{self.split}_images"]), np.asarray(npz[f"{self.split}_labels"])
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as err:
            raise ValueError(
                f"{self.path}: cannot read the npz ({type(err).__name__}: {err}); the file is truncated or corrupt, "
                f"download it again"
            ) from err
        raise ValueError(
            f"{self.path}: missing key(s) {missing}; an official MedMNIST file holds {keys}, found {sorted(found)}"
        )

    def _layout(self, images: np.ndarray, info: MedMNISTInfo | None) -> tuple[int, int]:
        if images.dtype != np.uint8:
            raise ValueError(f"{self.path}: expected uint8 images (0-255), got {images.dtype}")
        if info is not None:
            spatial_dims, in_channels = info.spatial_dims, info.in_channels
        else:  # RGB 2D files are (N, H, W, 3); 3D volumes (N, D, H, W) are cubes
            spatial_dims = 3 if images.ndim == 4 and images.shape[-1] != 3 else 2
            in_channels = 3 if images.ndim == 4 and spatial_dims == 2 else 1
        expected_ndim = 1 + spatial_dims + (1 if in_channels > 1 else 0)
        if images.ndim != expected_ndim:
            raise ValueError(
                f"{self.path}: expected {self.split}_images with {expected_ndim} axes for {spatial_dims}D "
                f"{in_channels}-channel images, got shape {images.shape}"
            )
        return spatial_dims, in_channels

    # -- Dataset -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = torch.from_numpy(np.asarray(self.images[index])).float() / 255.0
        if self.in_channels > 1:
            img = img.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
        else:
            img = img.unsqueeze(0)  # (1, H, W) or (1, D, H, W)
        if self.upsample_to is not None and self.upsample_to != img.shape[-1]:
            side = self.upsample_to
            img = F.interpolate(img[None], size=(side, side), mode="bilinear", align_corners=False)[0]
        sample = {
            "image": img.contiguous(),
            "label": torch.tensor(self.labels[index], dtype=torch.int64),
            "concepts": {},
            "measurements": {},
            "index": int(index),
        }
        return self.transform(sample) if self.transform is not None else sample

    def label_counts(self) -> dict[str, int]:
        """Number of samples per class name in this split."""
        counts = np.bincount(self.labels, minlength=len(self.label_names))
        return {name: int(c) for name, c in zip(self.label_names, counts)}

    def __repr__(self) -> str:
        return (
            f"MedMNIST(flag={self.flag!r}, split={self.split!r}, size={self.size}, n={len(self)}, "
            f"task={self.task!r}, in_channels={self.in_channels}, spatial_dims={self.spatial_dims})"
        )


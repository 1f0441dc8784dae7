"""The data sets of ``bench_transfer.py`` written as a user holds them: class folders of PNG / NIfTI
files, CSVs with concept columns, under the user cache directory.

Exporters return :class:`Case` lists (pixels in [0, 1], class name, patient, concepts);
:func:`write_user_data` writes them. Sources: MedMNIST files (Yang et al., "MedMNIST v2", Scientific
Data 2023), mini-MIAS (Suckling et al. 1994), IDRiD (Porwal et al., Data 2018), the LIDC-IDRI
readings (Armato et al., Medical Physics 2011) rendered by the zoo's ``lidc_nodules``.
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SEED = 0  # the draw of the exported cases
EXPORT_VERSION = 1  # bump when an exporter changes what it writes: the runs on the old export are due again


# ------------------------------------------------------------------------------------------------
# writing a user's data
# ------------------------------------------------------------------------------------------------
def _save_png(path: Path, image: np.ndarray) -> str:
    """Save ``image`` (H, W) or (H, W, 3) in [0, 1] as an 8-bit PNG; return the file name."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)).save(path)
    return path.name


def _save_nifti(path: Path, volume: np.ndarray) -> str:
    """Save ``volume`` (D, H, W) in [0, 1] as float32 NIfTI with 1 mm voxels; return the file name."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    # The zoo reads a NIfTI array in the voxel index order of its affine (MONAI's convention), so the
    # file's axes are the array's: the volume keeps the orientation of the MedMNIST file.
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume, dtype=np.float32), np.eye(4)), path)
    return path.name


@dataclass(frozen=True)
class Case:
    """One exported image: its pixels in [0, 1] ((H, W), (H, W, 3) or (D, H, W)), class name, patient
    and, where the source annotates them, concept values (columns of the CSVs)."""

    image: np.ndarray
    label: str
    patient: str
    concepts: dict[str, float] | None = None


def write_user_data(folder: Path, train: Sequence[Case], test: Sequence[Case], val: Sequence[Case] = (),
                    volumes: bool = False, meta: dict[str, Any] | None = None) -> Path:
    """Write ``folder/train/<class>/<n>.png`` (the user's training folder), ``folder/test.csv`` and,
    when given, ``folder/val.csv`` (an official validation split, read only by ``--choose``). Cases
    with concepts also get ``folder/train.csv`` (the same training images, for a concept bottleneck)
    and concept columns in every CSV.

    Args:
        folder: the data set's folder (replaced).
        train, test, val: the cases.
        volumes: write NIfTI volumes instead of PNG images.
        meta: a JSON-safe description written to ``folder/meta.json`` (counts are added).

    Returns:
        ``folder``.
    """
    if folder.exists():
        shutil.rmtree(folder)
    save, suffix = (_save_nifti, ".nii.gz") if volumes else (_save_png, ".png")
    concepts = list(dict.fromkeys(k for c in (*train, *test, *val) for k in (c.concepts or {})))

    def row(path: str, case: Case) -> str:
        values = [f"{case.concepts[k]:g}" if case.concepts and k in case.concepts else "" for k in concepts]
        return ",".join([path, case.label, case.patient, *values])

    head = ",".join(["image", "label", "patient", *concepts])
    listing = [head]
    for i, case in enumerate(train):
        name = save(folder / "train" / case.label / f"{i:05d}{suffix}", case.image)
        listing.append(row(f"train/{case.label}/{name}", case))
    if concepts:
        (folder / "train.csv").write_text("\n".join(listing) + "\n", encoding="utf-8")
    for name, cases in (("test", test), ("val", val)):
        if not cases:
            continue
        rows = [head]
        for i, case in enumerate(cases):
            rows.append(row(f"{name}/{save(folder / name / f'{i:05d}{suffix}', case.image)}", case))
        (folder / f"{name}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    counts = {name: {label: sum(c.label == label for c in cases) for label in sorted({c.label for c in cases})}
              for name, cases in (("train", train), ("test", test), ("val", val)) if cases}
    patients = {name: len({c.patient for c in cases}) for name, cases in (("train", train), ("test", test)) if cases}
    doc = {**(meta or {}), "counts": counts, "patients": patients, "export_version": EXPORT_VERSION}
    (folder / "meta.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return folder


def _subsample(n_total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``min(n, n_total)`` indices drawn without replacement, sorted."""
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))


def _medmnist(root: Path, file: str) -> dict[str, np.ndarray]:
    path = root / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass --data-root (the folder holding {file}) or set MLMI_ZOO_DATA")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def export_medmnist(root: Path, file: str, names: dict[int, str], n_train: int, n_test: int | None,
                    channels: int | None = None, with_val: bool = False) -> tuple[list[Case], list[Case], list[Case]]:
    """Cases of a MedMNIST file: ``n_train`` training images drawn from its train split, its test (and val) split.

    Args:
        root: folder holding ``file``.
        file: e.g. ``"vesselmnist3d.npz"``.
        names: class name of each label value (several values may share a name: binarisation).
        n_train: training images drawn (seeded) from the official train split.
        n_test: test images drawn from the official test split (None: all of it).
        channels: 3 repeats a greyscale image into RGB, 1 averages an RGB image to grey, None keeps it.
        with_val: also return the official validation split (all of it).

    Returns:
        ``(train, test, val)`` cases (val empty unless ``with_val``); each image is its own patient
        (MedMNIST files carry no patient ids).
    """
    data = _medmnist(root, file)
    rng = np.random.default_rng(SEED)

    def cases(split: str, n: int | None) -> list[Case]:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"][:, 0]
        chosen = np.arange(len(images)) if n is None else _subsample(len(images), n, rng)
        out = []
        for i in chosen:
            image = images[i].astype(np.float32) / 255.0
            if channels == 3 and image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=-1)
            elif channels == 1 and image.ndim == 3 and image.shape[-1] == 3:
                image = image.mean(-1)
            out.append(Case(image, names[int(labels[i])], f"{split}{i}"))
        return out

    return cases("train", n_train), cases("test", n_test), cases("val", None) if with_val else []


def check_adrenal_splits(root: Path) -> dict[str, Any]:
    """Check that ``adrenalmnist3d_64.npz`` holds the cases of ``adrenalmnist3d.npz`` in the same splits.

    Each 64^3 volume, area-averaged to 28^3 (trilinear interpolation), is correlated with the 28^3
    volume of the same split and index; labels must match exactly.

    Returns:
        per split: the number of cases, whether the labels agree, and the median and minimum
        correlation of the paired volumes.
    """
    small, large = _medmnist(root, "adrenalmnist3d.npz"), _medmnist(root, "adrenalmnist3d_64.npz")
    out: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        a, b = small[f"{split}_images"].astype(np.float32), large[f"{split}_images"].astype(np.float32)
        down = torch.nn.functional.interpolate(torch.from_numpy(b)[:, None], size=a.shape[1:], mode="trilinear",
                                               align_corners=False)[:, 0].numpy()
        x, y = a.reshape(len(a), -1), down.reshape(len(a), -1)
        x, y = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
        r = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-9)
        out[split] = {"cases": len(a), "labels_equal": bool(np.array_equal(small[f"{split}_labels"],
                                                                                large[f"{split}_labels"])),
                      "median_correlation": float(np.median(r)), "min_correlation": float(r.min())}
    return out


def _crop(image: np.ndarray, row: float, col: float, size: int) -> np.ndarray | None:
    """The ``size`` x ``size`` window of ``image`` (H, W[, C]) centred on (row, col) px, or None where it leaves the image."""
    r0, c0 = round(row - size / 2), round(col - size / 2)
    if r0 < 0 or c0 < 0 or r0 + size > image.shape[0] or c0 + size > image.shape[1]:
        return None
    return image[r0:r0 + size, c0:c0 + size]


# The binary concepts of a mini-MIAS crop: one per abnormality class of Info.txt (column -> class).
MIAS_CONCEPTS = {"calcification": "CALC", "circumscribed_mass": "CIRC", "spiculated_mass": "SPIC",
                 "ill_defined_mass": "MISC", "architectural_distortion": "ARCH", "asymmetry": "ASYM"}


def export_mias(root: Path, n_train: int, n_test: int, size: int = 64, spacing_mm: float = 0.4,
                jitters: int = 4, jitter_mm: float = 4.0) -> tuple[list[Case], list[Case]]:
    """Lesion crops vs normal-tissue crops of mini-MIAS at ``spacing_mm``, split by woman.

    Positives: for each radiologist circle, ``jitters`` crops centred on the circle's centre moved
    by a uniform offset within ``min(radius, jitter_mm)`` (the first one unmoved). Negatives: crops
    of normal mammograms centred at random breast pixels, with at least 95% of the crop inside the
    breast mask (:func:`mlmi_zoo.training.datasets.mias.breast_mask`). Training crops come from the
    train women, test crops from the test women (:func:`mlmi_zoo.training.datasets.mias.split_of_woman`);
    the validation women are not used. Positives and negatives are then drawn to ``n/2`` each where
    there are enough (every positive is kept when there are fewer).

    Each crop carries the radiologists' annotation as concepts (:data:`MIAS_CONCEPTS`): one binary
    concept per abnormality class (1 for the class of the circle the crop is centred on, 0 for the
    others; all 0 on a normal film) and the film's background tissue (``tissue``: 0 fatty,
    1 fatty-glandular, 2 dense-glandular).

    Returns:
        ``(train, test)`` cases; the patient is the woman.
    """
    from mlmi_zoo.training.datasets.mias import MIAS, TISSUES

    rng = np.random.default_rng(SEED)

    def cases(split: str, n: int) -> list[Case]:
        data = MIAS(root, split=split, spacing_mm=spacing_mm)
        positives: list[Case] = []
        normals: list[tuple[int, Any]] = []
        for i, record in enumerate(data.records):
            tissue = {"tissue": float(TISSUES.index(record.tissue))}
            if record.has_centre:
                sample = data[i]
                image = sample["image"][0].numpy()
                circled = [a for a in record.abnormalities if a.centre_mm is not None and a.radius_mm is not None]
                for abnormality, (row_mm, col_mm, radius_mm) in zip(circled, record.circles_mm(), strict=True):
                    concepts = {**{k: float(abnormality.kind == c) for k, c in MIAS_CONCEPTS.items()}, **tissue}
                    reach = min(radius_mm, jitter_mm) / spacing_mm
                    for j in range(jitters):
                        angle, dist = rng.uniform(0, 2 * math.pi), reach * math.sqrt(rng.uniform()) * (j > 0)
                        crop = _crop(image, row_mm / spacing_mm - 0.5 + dist * math.sin(angle),
                                     col_mm / spacing_mm - 0.5 + dist * math.cos(angle), size)
                        if crop is not None:
                            positives.append(Case(crop, "lesion", sample["patient_id"], concepts))
            elif not record.abnormal:
                normals.append((i, record))
        n_pos = min(len(positives), n // 2)
        positives = [positives[k] for k in _subsample(len(positives), n_pos, rng)]
        per_image = math.ceil((n - n_pos) / max(len(normals), 1))
        negatives: list[Case] = []
        for i, record in normals:
            normal = {**{k: 0.0 for k in MIAS_CONCEPTS}, "tissue": float(TISSUES.index(record.tissue))}
            sample = data[i]
            image, breast = sample["image"][0].numpy(), sample["breast"].numpy()
            rows, cols = np.nonzero(breast)
            taken = 0
            for k in rng.permutation(len(rows))[:200]:
                row, col = float(rows[k]), float(cols[k])
                window = _crop(breast.astype(np.float32), row, col, size)
                if window is None or window.mean() < 0.95:
                    continue
                crop = _crop(image, row, col, size)
                assert crop is not None
                negatives.append(Case(crop, "normal", sample["patient_id"], normal))
                taken += 1
                if taken == per_image:
                    break
        negatives = [negatives[k] for k in _subsample(len(negatives), n - n_pos, rng)]
        return positives + negatives

    return cases("train", n_train), cases("test", n_test)


def export_idrid(root: Path, n_train: int, n_test: int, size: int = 64, long_side: int = 1024,
                 min_fov: float = 0.9) -> tuple[list[Case], list[Case]]:
    """Tiles with vs without hard exudates (EX) of the IDRiD segmentation photographs.

    A photograph at ``long_side`` px is cut into ``size`` x ``size`` tiles on a grid (no overlap);
    a tile is kept when at least ``min_fov`` of it lies in the field of view; it is ``exudate``
    when it holds an EX pixel of the specialists' mask (clipped to the field of view), ``none``
    otherwise. Training tiles come from the module's ``train`` photographs, test tiles from its
    ``test`` photographs (the official test set); the ``val`` photographs are not used. Each set
    is drawn to ``n/2`` tiles per class (seeded).

    Returns:
        ``(train, test)`` cases; the patient is the photograph (IDRiD publishes no patient ids).
    """
    from mlmi_zoo.training.datasets.idrid import LESIONS, IDRiDSegmentation

    rng = np.random.default_rng(SEED)
    ex = LESIONS.index("EX")

    def cases(split: str, n: int) -> list[Case]:
        data = IDRiDSegmentation(root, split=split, size=long_side)
        tiles: dict[str, list[Case]] = {"exudate": [], "none": []}
        for i in range(len(data)):
            sample = data[i]
            if not bool(sample["annotated"][ex]):
                continue
            image = sample["image"].permute(1, 2, 0).numpy()
            mask, fov = sample["mask"][ex].numpy(), sample["fov"].numpy()
            for r in range(0, image.shape[0] - size + 1, size):
                for c in range(0, image.shape[1] - size + 1, size):
                    if fov[r:r + size, c:c + size].mean() < min_fov:
                        continue
                    label = "exudate" if mask[r:r + size, c:c + size].any() else "none"
                    tiles[label].append(Case(image[r:r + size, c:c + size], label, str(sample["image_id"])))
        half = n // 2
        return [tiles[k][j] for k in ("exudate", "none") for j in _subsample(len(tiles[k]), half, rng)]

    return cases("train", n_train), cases("test", n_test)


def export_idrid_photographs(root: Path, n_train: int, n_test: int | None, size: int = 256
                              ) -> tuple[list[Case], list[Case]]:
    """Whole IDRiD grading photographs at a long side of ``size`` px, padded to a black square, referable DR
    (ICDR grade >= 2) vs not.

    Training photographs are the module's ``train`` and ``val`` photographs together (a user's
    training folder; fine-tuning carves its own validation split), at most ``n_train`` of them
    (seeded); test photographs are the official test set (:class:`mlmi_zoo.training.datasets.idrid.IDRiDGrading`).

    Returns:
        ``(train, test)`` cases; the patient is the photograph (IDRiD publishes no patient ids).
    """
    from mlmi_zoo.training.datasets.idrid import IDRiDGrading

    rng = np.random.default_rng(SEED)
    names = ("no_referable_dr", "referable_dr")

    def cases(splits: tuple[str, ...], n: int | None) -> list[Case]:
        out = []
        for split in splits:
            data = IDRiDGrading(root, split=split, size=size, task="referable")
            for i in range(len(data)):
                sample = data[i]
                image = sample["image"].permute(1, 2, 0).numpy()  # (H, W, 3), H <= W = size
                square = np.zeros((size, size, 3), dtype=np.float32)
                top = (size - image.shape[0]) // 2
                square[top:top + image.shape[0], :image.shape[1]] = image
                out.append(Case(square, names[int(sample["label"])], str(sample["image_id"])))
        chosen = range(len(out)) if n is None else _subsample(len(out), n, rng)
        return [out[k] for k in chosen]

    return cases(("train", "val"), n_train), cases(("test",), n_test)


LIDC_WINDOW_HU = (-1000.0, 400.0)  # the LIDC nodules' HU into [0, 1] (8-bit PNGs; the fine-tune re-fits it)
LIDC_CONCEPTS = ("spiculated", "lobulated", "round")  # binary; the three ratings go as ordinal codes 0..4


def export_lidc(n_train: int) -> tuple[list[Case], list[Case], list[Case]]:
    """LIDC-IDRI nodules (the zoo's ``lidc_nodules`` rendering at 64 px) with the readers' shape ratings as
    concept columns: a concept-annotated choosing set (:func:`choose_one` scores its validation split).

    Training cases are ``n_train`` nodules drawn (seeded) from the patient-split ``train`` nodules, the
    validation cases all ``val`` nodules; the ``test`` nodules are not exported. Concepts:
    :data:`LIDC_CONCEPTS` (binary) and ``sphericity``, ``lobulation``, ``spiculation`` (the readers'
    median rating - 1). The patient is the LIDC patient.

    Returns:
        ``(train, [], val)``.
    """
    from mlmi_zoo.training.data_spec import DataSpec, build_dataset

    rng = np.random.default_rng(SEED)
    low, high = LIDC_WINDOW_HU

    def cases(split: str, n: int | None) -> list[Case]:
        ds = build_dataset(DataSpec("lidc_nodules", {"size": 64}), split)
        chosen = range(len(ds)) if n is None else _subsample(len(ds), n, rng)
        out = []
        for i in chosen:
            sample = ds[int(i)]
            image = ((sample["image"][0].numpy() - low) / (high - low)).clip(0, 1)
            concepts = {k: float(v) for k, v in sample["concepts"].items()}
            out.append(Case(image, ds.label_names[int(sample["label"])], str(sample["patient_id"]), concepts))
        return out

    return cases("train", n_train), [], cases("val", None)


def export_lidc_volumes(n_train: int, size: int = 64) -> tuple[list[Case], list[Case], list[Case]]:
    """LIDC-IDRI nodules as volumes (the zoo's ``lidc_nodules`` rendering, ``size``³ at its spacing, HU into
    [0, 1] by :data:`LIDC_WINDOW_HU`), benign vs malignant: the choosing set of a MIL model's fine-tuning
    defaults, as bags of axial slices (:mod:`_transfer_bags`).

    Training cases are ``n_train`` nodules drawn (seeded) from the patient-split ``train`` nodules, the
    validation cases all ``val`` nodules; the ``test`` nodules are not exported. A case's id (its bag's
    file name) is ``<patient>-<index>``: a patient may have several nodules.

    Returns:
        ``(train, [], val)``.
    """
    from mlmi_zoo.training.data_spec import DataSpec, build_dataset

    rng = np.random.default_rng(SEED)
    low, high = LIDC_WINDOW_HU

    def cases(split: str, n: int | None) -> list[Case]:
        ds = build_dataset(DataSpec("lidc_nodules", {"size": size, "spatial_dims": 3}), split)
        chosen = range(len(ds)) if n is None else _subsample(len(ds), n, rng)
        out = []
        for i in chosen:
            sample = ds[int(i)]
            volume = ((sample["image"][0].numpy() - low) / (high - low)).clip(0, 1)  # (D, H, W)
            out.append(Case(volume, ds.label_names[int(sample["label"])], f"{sample['patient_id']}-{int(i)}"))
        return out

    return cases("train", n_train), [], cases("val", None)

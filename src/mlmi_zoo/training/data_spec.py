"""What a recipe trains on: one frozen :class:`DataSpec`, its three splits, and their description.

A ``DataSpec`` names a kind of data set and its parameters; :func:`build_dataset` turns it into the
``train``, ``val`` or ``test`` split, :func:`describe` into a JSON-safe record (kind, parameters,
split sizes, what identifies each split, and a checksum of the source) that goes into the run
directory and the model's ``config.json`` — the data themselves never do.

How each kind is split (the evaluator refuses a test split that overlaps training, so every split
is identified in :func:`describe`):

* ``nodule_phantom`` / ``tilebag_phantom``: ONE procedural generator with seed ``params["seed"]``;
  case ``i`` is a function of ``(seed, i)`` only. The splits are disjoint index ranges of it:
  train ``[0, train_size)``, val ``[train_size, train_size + val_size)``, test after that. A
  sample's ``"index"`` is its case number in the generator, so indices never repeat across splits.
* ``lidc_nodules``: LIDC-IDRI nodules (one case per nodule, its readers' consensus contour) rendered by
  :class:`NodulePhantom` with ``source="lidc"``; the split is the patient-level split of
  :mod:`mlmi_zoo.training.datasets.lidc_index` (no patient in two splits). ``*_size`` optionally keeps the
  first n nodules of a split.
* ``medmnist``: the official train/val/test arrays of the ``.npz`` (MD5-verified); ``*_size``
  optionally keeps the first n.
* ``mias``: mini-MIAS mammograms (:mod:`mlmi_zoo.training.datasets.mias`); the fixed split by woman
  (both breasts in one split); ``*_size`` optionally keeps the first n images of a split.
* ``mias_bags``: the same images and split as bags of cached breast-tile features
  (:mod:`mlmi_zoo.training.datasets.mias_bags`); ``*_size`` optionally keeps the first n bags.
* ``idrid``: IDRiD fundus photographs (:mod:`mlmi_zoo.training.datasets.idrid`), ``params["dataset"]``
  ``"grading"``, ``"segmentation"``, ``"macula"`` (both sets, for a macular-edema model) or ``"lesions"`` (both
  sets, for a lesion-concept model of DR); the official test part is ``test``, ``train``/``val`` a fixed
  stratified partition of the official training part; ``*_size`` optionally keeps the first n.
* ``idrid_bags``: the same photographs and splits as bags of cached field-of-view tile features
  (:mod:`mlmi_zoo.training.datasets.idrid_bags`), ``params["dataset"]`` ``"grading"`` (graded bags) or
  ``"segmentation"`` (bags with tile truth from the lesion masks); ``*_size`` optionally keeps the first n.
* ``folder_csv`` / ``cached_bags``: either one file per split (``params["train_csv"]``,
  ``["val_csv"]``, ``["test_csv"]``; bags: ``train_dir``...) or one source that is partitioned by
  a permutation seeded with ``split_seed`` into ``val_fraction`` / ``test_fraction`` / the rest.
  :func:`describe` records the file checksums and the row indices of each split.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import torch
from torch.utils.data import Dataset, default_collate

__all__ = ["DataSpec", "SPLITS", "build_dataset", "describe", "collate_for", "SizedDataset", "IndexSubset",
           "MaterializedDataset"]

SPLITS = ("train", "val", "test")
DataKind = Literal["nodule_phantom", "lidc_nodules", "tilebag_phantom", "medmnist", "folder_csv", "cached_bags",
                   "mias", "mias_bags", "idrid", "idrid_bags"]


@dataclass(frozen=True)
class DataSpec:
    """A data set and how it is split.

    Attributes:
        kind: which loader builds it (see the module docstring for how each kind is split).
        params: keyword arguments of that loader (e.g. ``{"size": 64, "seed": 0}`` for a phantom,
            ``{"csv": "labels.csv", "label_names": ["benign", "malignant"]}`` for a CSV).
        train_size / val_size / test_size: number of cases per split. Required for phantoms (they
            define the index ranges); optional elsewhere, where they keep the first n of a split.
        val_fraction / test_fraction: share of a single CSV or bag folder held out for validation /
            testing (ignored when each split has its own file).
        split_seed: seed of the permutation that partitions a single CSV or bag folder.
        cache: render every case once and keep it in memory (for slow procedural sources).
        augment: ``None`` or ``"dihedral"`` (random flips and quarter turns of the training cases
            in the image plane, see :mod:`mlmi_zoo.training.augment`); validation and test never are.
    """

    kind: DataKind
    params: dict[str, Any] = field(default_factory=dict)
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    split_seed: int = 0
    cache: bool = False
    augment: str | None = None

    def __post_init__(self) -> None:
        for name in ("train_size", "val_size", "test_size"):
            n = getattr(self, name)
            if n is not None and n < 0:
                raise ValueError(f"data.{name} must be >= 0, got {n}")
        if not (0.0 <= self.val_fraction < 1.0 and 0.0 <= self.test_fraction < 1.0
                and self.val_fraction + self.test_fraction < 1.0):
            raise ValueError(
                f"data.val_fraction ({self.val_fraction}) and data.test_fraction ({self.test_fraction}) must be in "
                "[0, 1) and leave some cases for training"
            )
        if self.augment is not None:
            from mlmi_zoo.training.augment import AUGMENTATIONS

            if self.augment not in AUGMENTATIONS:
                raise ValueError(f"data.augment must be null or one of {AUGMENTATIONS}, got {self.augment!r}")
            if self.kind in _BAG_KINDS:
                raise ValueError(f"data.augment applies to images; a {self.kind} spec holds bags of instances")
        if self.kind in _PHANTOMS and (self.train_size is None or self.val_size is None):
            raise ValueError(f"a {self.kind} spec needs data.train_size and data.val_size (they define its index ranges)")

    def size_of(self, split: str) -> int | None:
        """The requested number of cases of ``split`` (``None``: all)."""
        _check_split(split)
        return getattr(self, f"{split}_size")


_PHANTOMS = ("nodule_phantom", "tilebag_phantom")
_BAG_KINDS = ("tilebag_phantom", "cached_bags", "mias_bags", "idrid_bags")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


_T_co = TypeVar("_T_co", covariant=True)


class SizedDataset(Dataset[_T_co]):
    """A map-style data set that knows its length: what the zoo's loaders, trainer and evaluation need.

    torch's :class:`~torch.utils.data.Dataset` leaves ``__len__`` optional, so a type checker cannot
    take the length of one; every data set of the zoo derives from this class instead, which a
    ``DataLoader`` accepts like any ``Dataset`` and ``len()`` accepts like any ``Sized``.
    """

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement __len__")


class IndexSubset(SizedDataset[Any]):
    """The cases ``indices`` of ``dataset``; other attributes (``label_names``...) pass through.

    Args:
        dataset: the full data set.
        indices: case numbers of the subset, in order.
    """

    def __init__(self, dataset: Dataset, indices: list[int] | range) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices"):  # not yet set (e.g. during unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)


# ---------------------------------------------------------------------------------------------
# split arithmetic
# ---------------------------------------------------------------------------------------------
def _phantom_ranges(spec: DataSpec) -> dict[str, range]:
    """Disjoint index ranges of the one generator: train, then val, then test."""
    n_train, n_val, n_test = spec.train_size or 0, spec.val_size or 0, spec.test_size or 0
    return {
        "train": range(0, n_train),
        "val": range(n_train, n_train + n_val),
        "test": range(n_train + n_val, n_train + n_val + n_test),
    }


def _fraction_split(n: int, spec: DataSpec, groups: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Partition ``range(n)`` by a permutation seeded with ``split_seed``; each part sorted.

    With ``groups`` (each case's patient) the permutation is of the patients, and a patient's cases
    go together: validation takes whole patients until it holds at least its share of the cases,
    then test, and training the rest.
    """
    n_val = int(round(n * spec.val_fraction))
    n_test = int(round(n * spec.test_fraction))
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} cases leave none for training with val_fraction={spec.val_fraction}, "
                         f"test_fraction={spec.test_fraction}")
    generator = torch.Generator().manual_seed(spec.split_seed)
    if groups is None:
        perm = torch.randperm(n, generator=generator).tolist()
        parts = {"val": perm[:n_val], "test": perm[n_val:n_val + n_test], "train": perm[n_val + n_test:]}
        return {k: sorted(v) for k, v in parts.items()}
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    names = sorted(members)
    order = [names[j] for j in torch.randperm(len(names), generator=generator).tolist()]
    parts = {"val": [], "test": [], "train": []}
    for g in order:
        part = ("val" if len(parts["val"]) < n_val else "test" if len(parts["test"]) < n_test else "train")
        parts[part].extend(members[g])
    if not parts["train"]:
        raise ValueError(f"{len(members)} patients leave none for training with val_fraction={spec.val_fraction}, "
                         f"test_fraction={spec.test_fraction}")
    return {k: sorted(v) for k, v in parts.items()}


def _first(indices: list[int] | range, n: int | None) -> list[int] | range:
    return indices if n is None else indices[:n]


def _per_split_files(params: dict[str, Any], key: str) -> dict[str, Any] | None:
    """``{"train": ..., "val": ..., "test": ...}`` when params hold ``train_<key>`` etc., else None."""
    found = {s: params.get(f"{s}_{key}") for s in SPLITS}
    if all(v is None for v in found.values()):
        return None
    return found  # a split without its file (e.g. only test_csv, to evaluate) is refused when it is built


def _loader_params(params: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in drop}


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def build_dataset(spec: DataSpec, split: str) -> SizedDataset[dict[str, Any]]:
    """Build one split of ``spec``.

    Args:
        spec: the data spec.
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        A map-style data set of sample dicts (images) or bag dicts (tile bags).

    Raises:
        ValueError: unknown split, inconsistent sizes or parameters.
        FileNotFoundError: a file the spec names does not exist.
    """
    ds = _build(spec, split)
    return MaterializedDataset(ds) if spec.cache else ds


class MaterializedDataset(SizedDataset[Any]):
    """Every case of ``dataset`` computed once and kept in memory; other attributes pass through.

    Procedural sources (LIDC-grounded nodules render each case from contours) cost tens of
    milliseconds a case; training reads each case many times. Cases depend only on their index, so
    caching changes nothing but speed.
    """

    def __init__(self, dataset: SizedDataset[Any]) -> None:
        from tqdm.auto import tqdm

        self.dataset = dataset
        self.items = [dataset[i] for i in tqdm(range(len(dataset)), desc="caching cases", leave=False,
                                                mininterval=2.0, disable=None)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "items"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _build(spec: DataSpec, split: str) -> SizedDataset[dict[str, Any]]:
    _check_split(split)
    p = dict(spec.params)
    if spec.kind == "nodule_phantom":
        from mlmi_zoo.training.datasets.phantoms import NodulePhantom

        ranges = _phantom_ranges(spec)
        total = sum(len(r) for r in ranges.values())
        return IndexSubset(NodulePhantom(total, source="synthetic", **p), ranges[split])
    if spec.kind == "tilebag_phantom":
        from mlmi_zoo.training.datasets.tilebag import TileBagPhantom

        ranges = _phantom_ranges(spec)
        total = sum(len(r) for r in ranges.values())
        return IndexSubset(TileBagPhantom(total, **p), ranges[split])
    if spec.kind == "lidc_nodules":
        from mlmi_zoo.training.datasets.phantoms import NodulePhantom

        return NodulePhantom(spec.size_of(split), source="lidc", split=split, **p)
    if spec.kind == "medmnist":
        from mlmi_zoo.training.datasets.medmnist import MedMNIST

        path = p.pop("path", None)
        ds = MedMNIST(path, split=split, **p)
        n = spec.size_of(split)
        return ds if n is None else IndexSubset(ds, range(min(n, len(ds))))
    if spec.kind == "mias":
        from mlmi_zoo.training.datasets.mias import MIAS

        return _take(MIAS(p.pop("root", None), split=split, **p), spec.size_of(split))
    if spec.kind == "mias_bags":
        from mlmi_zoo.training.datasets.mias_bags import MiasBags

        return MiasBags(p.pop("root", None), split=split, max_images=spec.size_of(split), **p)
    if spec.kind == "idrid_bags":
        from mlmi_zoo.training.datasets.idrid_bags import IDRiDBags

        return IDRiDBags(p.pop("root", None), split=split, max_images=spec.size_of(split), **p)
    if spec.kind == "idrid":
        from mlmi_zoo.training.datasets.idrid import idrid_dataset

        return _take(idrid_dataset(split=split, **p), spec.size_of(split))
    if spec.kind == "folder_csv":
        from mlmi_zoo.training.datasets.folder_csv import FolderCSVDataset

        files = _per_split_files(p, "csv")
        kwargs = _loader_params(p, tuple(f"{s}_csv" for s in SPLITS) + ("csv",))
        if files is not None:
            if files[split] is None:
                raise ValueError(f"data.params has no {split}_csv; add one or use a single `csv` with fractions")
            ds = FolderCSVDataset(files[split], **kwargs)
            return _take(ds, spec.size_of(split))
        if "csv" not in p:
            raise ValueError("a folder_csv spec needs data.params.csv (one CSV) or train_csv/val_csv/test_csv")
        ds = FolderCSVDataset(p["csv"], **kwargs)
        return IndexSubset(ds, _first(_fraction_split(len(ds), spec, ds.patients)[split], spec.size_of(split)))
    if spec.kind == "cached_bags":
        from mlmi_zoo.training.datasets.slides import CachedBagDataset

        dirs = _per_split_files(p, "dir")
        kwargs = _loader_params(p, tuple(f"{s}_dir" for s in SPLITS) + ("dir",))
        if dirs is not None:
            if dirs[split] is None:
                raise ValueError(f"data.params has no {split}_dir; add one or use a single `dir` with fractions")
            return _take(CachedBagDataset(dirs[split], **kwargs), spec.size_of(split))
        if "dir" not in p:
            raise ValueError("a cached_bags spec needs data.params.dir (one folder) or train_dir/val_dir/test_dir")
        ds = CachedBagDataset(p["dir"], **kwargs)
        return IndexSubset(ds, _first(_fraction_split(len(ds), spec)[split], spec.size_of(split)))
    raise ValueError(f"unknown data kind {spec.kind!r}")


def _take(ds: SizedDataset[dict[str, Any]], n: int | None) -> SizedDataset[dict[str, Any]]:
    return ds if n is None else IndexSubset(ds, range(min(n, len(ds))))


def collate_for(spec: DataSpec) -> Callable[[list[Any]], Any]:
    """The collate function of ``spec``'s batches: padded bags for MIL kinds, else ``default_collate``."""
    if spec.kind in _BAG_KINDS:
        from mlmi_zoo.training.datasets.collate import collate_bags

        return collate_bags
    return default_collate


# ---------------------------------------------------------------------------------------------
# description
# ---------------------------------------------------------------------------------------------
def _sha256(path: str | Path) -> str:
    from mlmi_zoo._weights import sha256_file

    return sha256_file(path)


def _indices_record(indices: list[int] | range) -> dict[str, Any]:
    """What identifies a split's cases: a range, or the sorted indices (and their sha256)."""
    if isinstance(indices, range):
        return {"index_range": [indices.start, indices.stop]}
    ids = sorted(int(i) for i in indices)
    if ids and ids == list(range(ids[0], ids[-1] + 1)):
        return {"index_range": [ids[0], ids[-1] + 1]}
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    record: dict[str, Any] = {"indices_sha256": digest}
    if len(ids) <= 5000:
        record["indices"] = ids
    return record


def describe(spec: DataSpec) -> dict[str, Any]:
    """A JSON-safe description of ``spec`` without any of its data.

    Returns:
        ``{"kind", "params", "splits": {split: {"size", ...identity}}, "source": {...checksums}}``.
        Phantom splits are identified by generator seed + ``index_range`` (global case numbers, so
        ranges of different splits never overlap); LIDC splits by their patient ids; MedMNIST splits
        by the official split name; CSV / bag splits by ``source`` (file name) + row
        ``index_range`` or ``indices`` WITHIN that source — compare indices only between splits with
        the same source. Sizes of file-based splits are read from the files.
    """
    from mlmi_zoo._config import to_jsonable

    out: dict[str, Any] = {"kind": spec.kind, "params": to_jsonable(spec.params), "splits": {}, "source": {}}
    p = spec.params
    if spec.kind in _PHANTOMS:
        ranges = _phantom_ranges(spec)
        gen = "phantoms.NodulePhantom" if spec.kind == "nodule_phantom" else "tilebag.TileBagPhantom"
        seed = p.get("seed", 0)
        out["source"] = {"generator": f"mlmi_zoo.training.datasets.{gen}", "seed": seed,
                         "parameters": to_jsonable(p), "checksum": "generator parameters (procedural data)"}
        for split, r in ranges.items():
            out["splits"][split] = {"size": len(r), "seed": seed, **_indices_record(r)}
        return out
    if spec.kind == "lidc_nodules":
        from mlmi_zoo.training.datasets.phantoms import NodulePhantom

        from mlmi_zoo.training.datasets.lidc import LidcNodules
        from mlmi_zoo.training.datasets.lidc_index import resolve_lidc_path

        for split in SPLITS:
            ds = NodulePhantom(spec.size_of(split), source="lidc", split=split, **p)
            nodules = LidcNodules(ds.config)
            patients = nodules.patient_ids()[: len(ds)]  # the cases this split uses, in case order
            out["splits"][split] = {"size": len(ds), "patient_split": split, "patient_ids": sorted(set(patients))}
        lidc_path = resolve_lidc_path(p.get("lidc_path"))
        out["source"] = {"file": lidc_path.name, "sha256": _sha256(lidc_path)}
        return out
    if spec.kind == "medmnist":
        from mlmi_zoo.training.datasets.medmnist import MedMNIST, file_md5

        for split in SPLITS:
            ds = build_dataset(spec, split)
            base: Dataset = ds
            while isinstance(base, (IndexSubset, MaterializedDataset)):
                base = base.dataset
            if not isinstance(base, MedMNIST):
                raise TypeError(f"expected a medmnist spec to build a MedMNIST data set, got a {type(base).__name__}")
            # rows [0, size) of the file's own `{split}_images` array: the official splits are disjoint
            out["splits"][split] = {"size": len(ds), "official_split": split, "rows_of_official_split": [0, len(ds)]}
            out["source"] = {"file": Path(base.path).name, "md5": file_md5(base.path), "flag": base.flag}
        return out
    if spec.kind == "mias":
        from mlmi_zoo.training.datasets.mias import MIAS

        for split in SPLITS:
            ds = build_dataset(spec, split)
            mias: Dataset = ds
            while isinstance(mias, (IndexSubset, MaterializedDataset)):
                mias = mias.dataset
            if not isinstance(mias, MIAS):
                raise TypeError(f"expected a mias spec to build a MIAS data set, got a {type(mias).__name__}")
            records = mias.records[: len(ds)]  # the images this split uses, in case order
            checksums = mias.source_checksums(records)
            out["splits"][split] = {"size": len(ds), "women": sorted({r.woman for r in records}),
                                    "images": [r.name for r in records], "films": checksums["films"]}
            out["source"] = {"folder": mias.folder.name, "Info.txt": checksums["Info.txt"]}
        return out
    if spec.kind == "mias_bags":
        from mlmi_zoo.training.datasets.mias_bags import mias_bag_splits

        return {**out, **mias_bag_splits(dict(p), {split: spec.size_of(split) for split in SPLITS})}
    if spec.kind == "idrid_bags":
        from mlmi_zoo.training.datasets.idrid_bags import idrid_bag_splits

        return {**out, **idrid_bag_splits(dict(p), {split: spec.size_of(split) for split in SPLITS})}
    if spec.kind == "idrid":
        from mlmi_zoo.training.datasets.idrid import IDRiDGrading, IDRiDSegmentation, source_checksums
        from mlmi_zoo.training.datasets.idrid_joined import IDRiDLesions, IDRiDMacula

        read: list[Path] = []
        for split in SPLITS:
            ds = build_dataset(spec, split)
            idrid: Dataset = ds
            while isinstance(idrid, (IndexSubset, MaterializedDataset)):
                idrid = idrid.dataset
            if not isinstance(idrid, (IDRiDGrading, IDRiDSegmentation, IDRiDMacula, IDRiDLesions)):
                raise TypeError(f"expected an idrid spec to build an IDRiD data set, got a {type(idrid).__name__}")
            used = idrid.image_ids[: len(ds)]  # the photographs this split uses, in case order
            out["splits"][split] = {"size": len(ds), "official_part": idrid.official_part, "image_ids": list(used)}
            read += idrid.files_read(used)
            out["source"] = {"folder": idrid.folder.name, "set": idrid.set_name, **source_checksums(idrid.folder, read)}
        return out
    key = "csv" if spec.kind == "folder_csv" else "dir"
    files = _per_split_files(p, key)
    sources: dict[str, Any] = {}
    for split in SPLITS:
        if files is not None and files[split] is None:
            out["splits"][split] = {"size": 0}
            continue
        ds = build_dataset(spec, split)
        src = files[split] if files is not None else p[key]
        indices = ds.indices if isinstance(ds, IndexSubset) else range(len(ds))
        out["splits"][split] = {"size": len(ds), "source": Path(src).name, **_indices_record(indices)}
        if files is None:
            out["splits"][split]["split_seed"] = spec.split_seed
        sources[Path(src).name] = _source_checksum(src, spec.kind)
    out["source"] = sources
    return out


def _source_checksum(src: str | Path, kind: str) -> dict[str, Any]:
    """sha256 of a CSV, or of the sorted (name, sha256) list of a folder's feature caches."""
    src = Path(src)
    if kind == "folder_csv":
        return {"sha256": _sha256(src)}
    files = sorted(src.glob("*.safetensors"))
    listing = [[f.name, _sha256(f)] for f in files]
    return {"num_files": len(files), "sha256_of_listing": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}

"""mini-MIAS mammograms as bags of cached tile features: bag = mammogram, instance = tile of the breast.

Data: J. Suckling et al., "The Mammographic Image Analysis Society Digital Mammogram Database",
Excerpta Medica, International Congress Series 1069, pp. 375-378, 1994 (research use only; see
:mod:`.mias`). Multiple-instance learning as in Ilse, Tomczak & Welling, "Attention-based Deep
Multiple Instance Learning", ICML 2018; each tile encoded once by a frozen network and the bags of
cached features trained on, as in CLAM (Lu et al., Nature Biomedical Engineering 2021). Encoder:
EfficientNet-Lite0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019) with Google's ImageNet weights, through the zoo's offline pretrained mechanism
(:mod:`mlmi_zoo.architectures.blocks.pretrained`).

Per image of a :class:`~.mias.MIAS` split (the fixed split by woman; both breasts in one split):

1. The film at ``spacing_mm`` is cut into breast tiles of ``tile_mm`` on a grid of ``stride_mm``
   (:func:`~.mias.breast_tiles`; a tile is kept when at least ``min_breast_fraction`` of it is breast).
2. Each tile (one grey channel in ``[0, 1]``) is fed at its own size (``input_px`` ``None``: the
   spacing sets the detail the encoder sees) or resized to ``input_px`` pixels (bilinear; with
   antialiasing when it shrinks), normalised as the encoder's base weights expect (the ImageNet
   EfficientNet-Lite weights take ``(x - 0.5) / 0.5``; a randomly initialised encoder gets the same
   transform so that the two feature sets differ only in the weights), and encoded by the frozen
   encoder, its last feature map averaged over space: ``(N, D)``. **Grey to three channels**: the
   encoder is built with one input channel, for which timm sums the first convolution's RGB kernels
   (``adapt_input_conv``); with the same mean and std on every channel this is exactly the network
   fed the grey tile repeated on R, G and B, at a third of the first layer's cost.
3. Only the encoder's output is cached (the expensive part): one safetensors file per image (fp16
   ``feats``, int64 grid ``coords``, JSON metadata; :func:`~.feature_cache.cache_features`, written
   atomically) under ``<cache_dir()>/mias_bags/<key>/``, where ``key`` is a hash of everything that
   changes the features (encoder, its weights' sha256 or random seed, spacing, tiling, input size).
   A file whose film changed (size or modification time), or whose grid no longer matches the tiles,
   is encoded again. Nothing is written into the data folder or the repository.
4. Everything else is computed from the image on load (cheap, and always the current truth).

A bag: ``{"feats": float32 (N, D), "coords": int64 (N, 2) (row, col) in tile-grid units (the tile's
top-left pixel / the stride), "instance_labels": float32 (N,) 1 where the tile overlaps a radiologist
circle, 0 elsewhere, NaN on every tile of an abnormal image without a centre, "instance_controls":
{"brightness": (N,) the tile's mean intensity, "breast_centre": (N,) minus the distance in mm of the
tile's centre to the centroid of the breast mask}, "instance_area_mm2": float32 (N,) the area of the
radiologists' discs inside each tile (NaN where the instance label is), "measurements":
{"lesion_area_mm2": their sum (0 on a normal film, NaN without a circle), "radius_mm": the largest
circle's radius (NaN on a normal film or without a circle)}, "label": int64 (normal 0 / abnormal 1, or benign /
malignant), "index": image number - 1, "patient_id": "mias-wNNN" (the woman), "name": "mdbNNN",
"has_centre": bool}``. The two controls are the image-processing scores that could fake instance
localisation without any learning: lesions may simply be brighter than their surroundings, or lie
nearer the middle of the breast (see :mod:`mlmi_zoo.evaluation.controls`).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from mlmi_zoo.training.datasets.feature_cache import CACHE_SUFFIX, CachedTileBags, TileEncoder, TileFeatureCache
from mlmi_zoo.training.datasets.mias import MIAS, MiasRecord, breast_tiles

__all__ = ["BagFeatureSettings", "TileEncoder", "MiasBags", "mias_bag_splits", "CONTROL_NAMES"]


_CACHE_VERSION = 1
CONTROL_NAMES = ("brightness", "breast_centre")


@dataclass(frozen=True)
class BagFeatureSettings:
    """How the tiles of a mammogram become feature vectors (everything the cache key depends on).

    Attributes:
        spacing_mm: pixel edge of the resampled film, one of :data:`~.mias.SPACINGS_MM`.
        tile_mm: tile side in mm.
        stride_mm: grid step in mm; ``None`` means ``tile_mm`` (no overlap).
        min_breast_fraction: the least breast share of a kept tile.
        encoder: a timm model name (``tf_efficientnet_lite0``) or one of the zoo's ResNets (``resnet8``,
            random initialisation only; for fast tests).
        init: ``"imagenet"`` or ``"random"`` (see :func:`~mlmi_zoo.architectures.blocks.pretrained.resolve_init`).
        input_px: side of the encoder's input, every tile resized to it; ``None``: the tile's own pixels.
        encoder_seed: seed of a randomly initialised encoder (ignored for pretrained weights).
    """

    spacing_mm: float = 0.8
    tile_mm: float = 25.6
    stride_mm: float | None = None
    min_breast_fraction: float = 0.5
    encoder: str = "tf_efficientnet_lite0"
    init: str = "imagenet"
    input_px: int | None = None
    encoder_seed: int = 0

    def __post_init__(self) -> None:
        if self.input_px is not None and not (isinstance(self.input_px, int) and 16 <= self.input_px <= 1024):
            raise ValueError(f"input_px must be None (the tile's own size) or a whole number of pixels in [16, 1024], "
                             f"got {self.input_px!r}")
        if self.init not in ("imagenet", "random"):
            raise ValueError(f"init must be 'imagenet' or 'random' (frozen encoder weights), got {self.init!r}")
        for name in ("tile_mm", "stride_mm"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive length in mm, got {value!r}")


def _film_stamp(path: Path) -> list[Any]:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


class MiasBags(CachedTileBags):
    """One split of mini-MIAS as bags of cached breast-tile features (see the module docstring).

    Encodes the tiles of every image whose features are not cached yet when it is built (with a
    progress bar), then holds every bag in memory (a few MB).

    Args:
        root: the data folder holding ``mias/`` (or the ``mias`` folder itself); ``None`` reads
            ``$MLMI_ZOO_DATA``.
        split: ``"train"``, ``"val"``, ``"test"`` (women, :func:`~.mias.split_of_woman`) or ``"all"``.
        task: ``"abnormal"`` (normal 0 / abnormal 1) or ``"severity"`` (benign 0 / malignant 1).
        images: keep only these image names (``"mdbNNN"``) of the split, in this order; ``None``: all.
        max_images: keep only the first ``max_images`` bags (after ``images``); ``None``: all. Images
            left out are neither read nor encoded.
        batch_size: tiles per encoder pass.
        **features: the fields of :class:`BagFeatureSettings` (``spacing_mm``, ``tile_mm``, ...).

    Attributes:
        records: the split's :class:`~.mias.MiasRecord` of the bags, in order; settings; label_names;
            cache_folder; encoded (how many images this instance encoded, 0 when all were cached);
            feature_dim.

    Raises:
        DataNotFoundError: no data folder given, or no ``mias/Info.txt`` in it.
        ValueError: a bad split, task or feature setting, an unknown image name, or an image without
            any breast tile (lower ``min_breast_fraction`` or ``tile_mm``).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, split: str = "train", task: str = "abnormal",
                 images: Sequence[str] | None = None, max_images: int | None = None, batch_size: int = 64,
                 **features: Any) -> None:
        unknown = sorted(set(features) - set(BagFeatureSettings.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown mias_bags parameter(s) {unknown}; expected root, split, task, images, max_images, "
                             f"batch_size or one of {sorted(BagFeatureSettings.__dataclass_fields__)}")
        self.settings = BagFeatureSettings(**features)
        self.images = MIAS(root, split=split, spacing_mm=self.settings.spacing_mm, task=task)
        records = self.images.records
        if images is not None:
            by_name = {r.name: r for r in records}
            missing = [n for n in images if n not in by_name]
            if missing:
                raise ValueError(f"images {missing[:10]} are not in the {split!r} split of this task")
            records = [by_name[n] for n in images]
        if max_images is not None:
            if max_images < 0:
                raise ValueError(f"max_images must be >= 0 or None, got {max_images}")
            records = records[:max_images]
        self.records: list[MiasRecord] = list(records)
        self.split, self.task, self.batch_size = split, task, batch_size
        self.label_names = self.images.label_names
        self._position = {r.number: i for i, r in enumerate(self.images.records)}
        self._cache = TileFeatureCache(self.settings, "mias_bags", in_chans=1, batch_size=batch_size,
                                       version=_CACHE_VERSION)
        self.cache_folder = self._cache.folder
        self.bags = [self._bag(r) for r in self._progress(self.records)]

    def _progress(self, records: Sequence[MiasRecord]) -> Any:
        from tqdm.auto import tqdm

        return tqdm(records, desc=f"mini-MIAS bags ({self.split})", leave=False, mininterval=2.0, disable=None)

    # -- bags --------------------------------------------------------------------------------------
    def cache_path(self, record: MiasRecord) -> Path:
        """The feature cache file of ``record``."""
        return self.cache_folder / f"{record.name}{CACHE_SUFFIX}"

    def _features(self, record: MiasRecord, tiles: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """(N, D) features of the tiles of ``record``: from the cache, else encoded and cached."""
        return self._cache.features(self.cache_path(record), "film", _film_stamp(self.images.image_path(record)),
                                    tiles, coords)

    def _bag(self, record: MiasRecord) -> dict[str, Any]:
        s = self.settings
        sample = self.images[self._position[record.number]]
        tiles = breast_tiles(sample, s.tile_mm, s.stride_mm, s.min_breast_fraction)
        if tiles.boxes.shape[0] == 0:
            raise ValueError(f"{record.name} has no tile with at least {s.min_breast_fraction:.0%} breast at "
                             f"tile_mm={s.tile_mm}; lower min_breast_fraction or tile_mm")
        coords = tiles.boxes[:, :2] // tiles.stride_px  # (N, 2) grid units
        feats = self._features(record, tiles.images, coords)
        spacing = s.spacing_mm
        breast = sample["breast"]  # (H, W) bool
        rows, cols = breast.nonzero(as_tuple=True)
        centroid = torch.stack([rows.double().mean(), cols.double().mean()]) + 0.5  # pixel centres, in pixels
        centres = tiles.boxes[:, :2].double() + tiles.tile_px / 2  # (N, 2) tile centres, in pixels
        distance_mm = torch.linalg.vector_norm(centres - centroid, dim=-1) * spacing  # (N,)
        return {
            "feats": feats,  # (N, D)
            "coords": coords,  # (N, 2)
            "instance_labels": tiles.instance_truth.float(),  # (N,)
            "instance_area_mm2": tiles.lesion_area_mm2,  # (N,) disc area inside each tile
            # the discs' area inside the bag's tiles (what an area head can see), and the radiologist's radius
            "measurements": {"lesion_area_mm2": tiles.lesion_area_mm2.sum(),
                             "radius_mm": sample["measurements"]["radius_mm"]},
            "instance_controls": {"brightness": tiles.images.mean(dim=(1, 2, 3)).float(),
                                  "breast_centre": (-distance_mm).float()},
            "label": sample["label"],
            "index": sample["index"],
            "patient_id": sample["patient_id"],
            "name": record.name,
            "has_centre": record.has_centre,
        }

    def photograph(self, index: int, shrink: int = 2) -> tuple[torch.Tensor, int]:
        """Bag ``index``'s film shrunk ``shrink`` times (area average), to show its tiles on (a demo sample).

        Returns:
            ``(image, tile_px)``: (1, H / shrink, W / shrink) grey film in ``[0, 1]`` on 8-bit levels, and the
            side of one tile on it in pixels (a tile at grid ``(row, col)`` covers rows ``row * tile_px`` onwards).
        """
        image = self._film(index)["image"]
        small = F.avg_pool2d(image[None], self._shrink(shrink))[0]
        return (small * 255).round() / 255, self._stride_px() // shrink

    def photograph_annotations(self, index: int, shrink: int = 2) -> dict[str, torch.Tensor]:
        """What lies on :meth:`photograph`: ``"mask"`` (1, h, w) bool, the radiologists' discs, ``"breast"``
        (h, w) bool and ``"spacing"`` (2,) mm of one of its pixels."""
        sample = self._film(index)
        k = self._shrink(shrink)
        mask = F.max_pool2d(sample["mask"].float()[None], k)[0] > 0
        breast = F.avg_pool2d(sample["breast"].float()[None, None], k)[0, 0] >= 0.5
        return {"mask": mask, "breast": breast, "spacing": sample["spacing"] * k}

    def _film(self, index: int) -> dict[str, Any]:
        return self.images[self._position[self.records[index].number]]

    def _stride_px(self) -> int:
        s = self.settings
        return int(round((s.tile_mm if s.stride_mm is None else s.stride_mm) / s.spacing_mm))

    def _shrink(self, shrink: int) -> int:
        if shrink < 1 or self._stride_px() % shrink:
            raise ValueError(f"shrink must divide the tile grid's step of {self._stride_px()} pixels, got {shrink}")
        return shrink

    def __repr__(self) -> str:
        return (f"MiasBags(split={self.split!r}, task={self.task!r}, n={len(self)}, settings={self.settings}, "
                f"cache={str(self.cache_folder)!r})")


def mias_bag_splits(params: dict[str, Any], sizes: dict[str, int | None]) -> dict[str, Any]:
    """The description of a ``mias_bags`` data spec without encoding anything (for :func:`describe`).

    Args:
        params: the spec's parameters (``root``, ``task``, the feature settings...).
        sizes: split -> the number of images kept (``None``: all).

    Returns:
        ``{"splits": {split: {"size", "women", "images", "films"}}, "source": {...}}``.
    """
    p = dict(params)
    root = p.pop("root", None)
    task = p.pop("task", "abnormal")
    images = p.pop("images", None)
    p.pop("max_images", None)  # the spec's *_size keeps the first n
    settings = BagFeatureSettings(**{k: v for k, v in p.items() if k in BagFeatureSettings.__dataclass_fields__})
    out: dict[str, Any] = {"splits": {}, "source": {}}
    for split, n in sizes.items():
        ds = MIAS(root, split=split, spacing_mm=settings.spacing_mm, task=task)
        by_name = {r.name: r for r in ds.records}
        records = ds.records if images is None else [by_name[name] for name in images if name in by_name]
        records = records[:n] if n is not None else records
        checksums = ds.source_checksums(records)
        out["splits"][split] = {"size": len(records), "women": sorted({r.woman for r in records}),
                                "images": [r.name for r in records], "films": checksums["films"]}
        out["source"] = {"folder": ds.folder.name, "Info.txt": checksums["Info.txt"], "features": asdict(settings)}
    return out

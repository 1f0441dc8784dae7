"""IDRiD fundus photographs as bags of cached tile features: bag = photograph (one eye), instance = tile of the field of view.

Data: P. Porwal et al., "Indian Diabetic Retinopathy Image Dataset (IDRiD)", Data 3(3):25, 2018, and
"IDRiD: Diabetic Retinopathy - Segmentation and Grading Challenge", Medical Image Analysis 59:101561,
2020 (CC BY 4.0; see :mod:`.idrid`). Multiple-instance learning as in Ilse, Tomczak & Welling,
"Attention-based Deep Multiple Instance Learning", ICML 2018; each tile encoded once by a frozen
network and the bags of cached features trained on, as in CLAM (Lu et al., Nature Biomedical
Engineering 2021). Encoder: EfficientNet-Lite0 (Tan & Le, ICML 2019) with Google's ImageNet weights,
through the zoo's offline pretrained mechanism (:mod:`mlmi_zoo.architectures.blocks.pretrained`).

Per photograph of an :class:`~.idrid.IDRiDGrading` or :class:`~.idrid.IDRiDSegmentation` split (the
fixed splits of :mod:`.idrid`):

1. The photograph at long side ``size`` (default 1072, the stored grading resolution, about 4 camera
   pixels per returned pixel) is cut into square tiles of ``tile_px`` on a grid from the top-left
   corner (no overlap; a remainder narrower than a tile is not tiled). A tile is kept when at least
   ``min_fov_fraction`` of its pixels lie in the field of view (the black surround is not tissue).
   Every photograph shares the same frame, so a tile position ``(row, col)`` is the same field angle
   in every bag.
2. Each RGB tile in ``[0, 1]`` is normalised as the encoder's weights expect and encoded by the frozen
   encoder at its own size (``input_px`` ``None``) or resized to ``input_px``; the last feature map
   averaged over space gives ``(N, D)``.
3. Only the encoder's output is cached: one safetensors file per photograph (fp16 ``feats``, int64
   grid ``coords``, JSON metadata; :func:`~.feature_cache.cache_features`, written atomically) under
   ``<cache_dir()>/idrid_bags/<key>/<set>/<official part>/``, where ``key`` is a hash of everything that
   changes the features. A file whose photograph changed, or whose grid no longer matches, is encoded
   again. Nothing is written into the data folder or the repository.

A grading bag: ``{"feats": float32 (N, D), "coords": int64 (N, 2) (row, col) in tile units, "label":
int64 (the grading set's task: referable DR 0/1, the ICDR grade 0-4 or the macular-edema risk 0-2), "index",
"patient_id", "image_id"}``.
Grading photographs have no lesion masks, so their bags carry no instance truth.

A segmentation bag (no grade is published for these photographs: ``"label"`` is -1) adds the instance
truth of the retina specialists' masks: ``"instance_labels"`` float32 (N,) 1 where the tile holds at
least one pixel of a lesion of ``lesions`` (default all four types; a type is counted only where it
was annotated, see :mod:`.idrid`), and ``"instance_controls"``, three scores per tile that could fake
instance localisation without any learning (see :mod:`mlmi_zoo.evaluation.controls`):

* ``"bright_pixels"``: the brightest green-channel value among the tile's field-of-view pixels
  (exudates are bright; so are the optic disc and reflections);
* ``"dark_pixels"``: minus the darkest green value (haemorrhages and microaneurysms are dark; so are
  vessels);
* ``"lesion_prior"``: how often a tile at this grid position held a lesion pixel in the segmentation
  *training* split (44 photographs), the tile-level centre prior.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.nn import functional as F

from mlmi_zoo.training.datasets.feature_cache import (CACHE_SUFFIX, CachedTileBags, TileEncoder, TileFeatureCache,
                                                      encode_tiles)
from mlmi_zoo.training.datasets.idrid import (LESION_NAMES, LESIONS, MAX_SIZE, IDRiDGrading, IDRiDSegmentation,
                                             check_size)

__all__ = ["IDRiDBagSettings", "IDRiDBags", "FovTiles", "fov_tiles", "photograph_bag", "idrid_bag_splits",
           "CONTROL_NAMES"]


_CACHE_VERSION = 1
CONTROL_NAMES = ("bright_pixels", "dark_pixels", "lesion_prior")
_DEFAULT_LESIONS = "MA+HE+EX+SE"


@dataclass(frozen=True)
class IDRiDBagSettings:
    """How the tiles of a photograph become feature vectors (everything the cache key depends on).

    Attributes:
        size: long side of the photograph in pixels (see :func:`~.idrid.check_size`).
        tile_px: tile side in pixels at ``size``.
        min_fov_fraction: the least field-of-view share of a kept tile.
        encoder: a timm model name (``tf_efficientnet_lite0``) or one of the zoo's ResNets (``resnet8``,
            random initialisation only; for fast tests).
        init: ``"imagenet"`` or ``"random"``.
        input_px: side of the encoder's input, every tile resized to it; ``None``: the tile's own pixels.
        encoder_seed: seed of a randomly initialised encoder (ignored for pretrained weights).
    """

    size: int = MAX_SIZE
    tile_px: int = 64
    min_fov_fraction: float = 0.5
    encoder: str = "tf_efficientnet_lite0"
    init: str = "imagenet"
    input_px: int | None = None
    encoder_seed: int = 0

    def __post_init__(self) -> None:
        check_size(self.size)
        if not (isinstance(self.tile_px, int) and 8 <= self.tile_px <= self.size // 4):
            raise ValueError(f"tile_px must be a whole number of pixels in [8, size / 4 = {self.size // 4}], "
                             f"got {self.tile_px!r}")
        if not 0.0 <= self.min_fov_fraction <= 1.0:
            raise ValueError(f"min_fov_fraction must be in [0, 1], got {self.min_fov_fraction!r}")
        if self.input_px is not None and not (isinstance(self.input_px, int) and 16 <= self.input_px <= 1024):
            raise ValueError(f"input_px must be None (the tile's own size) or a whole number of pixels in [16, 1024], "
                             f"got {self.input_px!r}")
        if self.init not in ("imagenet", "random"):
            raise ValueError(f"init must be 'imagenet' or 'random' (frozen encoder weights), got {self.init!r}")


@dataclass(frozen=True, eq=False)
class FovTiles:
    """The field-of-view tiles of one photograph.

    Attributes:
        coords: int64 (N, 2) grid position ``(row, col)`` of each kept tile (top-left pixel / tile_px).
        images: float32 (N, 3, t, t) the tiles' pixels.
        fov_fraction: float32 (N,) the share of each tile in the field of view.
        keep: bool (rows, cols) which grid positions were kept.
        tile_px: ``t``.
    """

    coords: torch.Tensor
    images: torch.Tensor
    fov_fraction: torch.Tensor
    keep: torch.Tensor
    tile_px: int


def fov_tiles(image: torch.Tensor, fov: torch.Tensor, tile_px: int, min_fov_fraction: float = 0.5) -> FovTiles:
    """Cut a photograph into non-overlapping square tiles and keep those mostly in the field of view.

    Args:
        image: (3, H, W) RGB in ``[0, 1]``.
        fov: (H, W) bool field of view.
        tile_px: tile side in pixels.
        min_fov_fraction: the least field-of-view share of a kept tile.

    Returns:
        A :class:`FovTiles` (possibly with no tile).

    Raises:
        ValueError: shapes that disagree, or a tile larger than the image.
    """
    if image.ndim != 3 or tuple(fov.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"image must be (C, H, W) and fov (H, W) of the same size; got {tuple(image.shape)} and "
                         f"{tuple(fov.shape)}")
    h, w = image.shape[-2:]
    if tile_px > min(h, w):
        raise ValueError(f"tile_px={tile_px} is larger than the {h} x {w} photograph")
    fraction = F.avg_pool2d(fov.float()[None, None], tile_px, tile_px)[0, 0]  # (rows, cols)
    keep = fraction >= min_fov_fraction
    rows, cols = keep.nonzero(as_tuple=True)
    tiles = image.unfold(-2, tile_px, tile_px).unfold(-2, tile_px, tile_px)  # (C, rows, cols, t, t)
    tiles = tiles.permute(1, 2, 0, 3, 4)[keep]  # (N, C, t, t)
    return FovTiles(torch.stack([rows, cols], dim=1).long(), tiles.float().contiguous(), fraction[keep].float(), keep,
                    tile_px)


def photograph_bag(image: torch.Tensor, fov: torch.Tensor | None = None,
                   settings: IDRiDBagSettings | None = None, encoder: TileEncoder | None = None) -> dict[str, torch.Tensor]:
    """One fundus photograph as the bag a model of this module's bags takes: what to explain a new photograph with.

    Args:
        image: (3, H, W) RGB in ``[0, 1]``, the full camera frame resized to long side ``settings.size``
            (the bags' scale: a tile must cover the same field angle as in training).
        fov: (H, W) bool field of view; ``None`` finds it with :func:`~.idrid.field_of_view`.
        settings: the tiling and encoder (default :class:`IDRiDBagSettings`, the bundled models' settings).
        encoder: a :class:`~.feature_cache.TileEncoder` built from ``settings`` (built when ``None``; pass one
            to explain many photographs).

    Returns:
        ``{"feats": (1, N, D), "coords": (1, N, 2)}``: ``model.explain(**photograph_bag(image))``.

    Raises:
        ValueError: an image that is not RGB at the settings' size, or one without a field-of-view tile.
    """
    s = settings or IDRiDBagSettings()
    if image.ndim != 3 or image.shape[0] != 3 or max(image.shape[-2:]) != s.size:
        raise ValueError(f"image must be an RGB photograph (3, H, W) with long side {s.size} (the bags' scale; resize "
                         f"the full camera frame first), got {tuple(image.shape)}")
    if fov is None:
        from mlmi_zoo.training.datasets.idrid import field_of_view

        rgb = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        fov = torch.from_numpy(field_of_view(rgb))
    tiles = fov_tiles(image, fov, s.tile_px, s.min_fov_fraction)
    if tiles.coords.shape[0] == 0:
        raise ValueError(f"no tile of {s.tile_px} px is at least {s.min_fov_fraction:.0%} field of view")
    encoder = encoder or TileEncoder(s, in_chans=3)
    feats = encode_tiles(encoder, tiles.images, transform=encoder.prepare)
    return {"feats": feats[None], "coords": tiles.coords[None]}


def _tile_max(values: torch.Tensor, fov: torch.Tensor, tile_px: int, keep: torch.Tensor) -> torch.Tensor:
    """(H, W) values -> (N,) the maximum over each kept tile's field-of-view pixels."""
    masked = torch.where(fov, values, torch.full_like(values, -torch.inf))
    return F.max_pool2d(masked[None, None], tile_px, tile_px)[0, 0][keep]


def _parse_lesions(lesions: str | Sequence[str]) -> tuple[str, ...]:
    names = tuple(lesions.split("+")) if isinstance(lesions, str) else tuple(lesions)
    bad = [n for n in names if n not in LESIONS[:-1]]
    if not names or bad:
        raise ValueError(f"lesions must name lesion types of {LESIONS[:-1]} joined by '+', got {lesions!r}")
    return names


class IDRiDBags(CachedTileBags):
    """One split of an IDRiD set as bags of cached field-of-view tile features (see the module docstring).

    Encodes the tiles of every photograph whose features are not cached yet when it is built (with a
    progress bar), then holds every bag in memory (a few MB).

    Args:
        root: the folder that holds ``idrid/``, or ``None`` for ``$MLMI_ZOO_DATA``.
        dataset: ``"grading"`` (bags with a grade, no instance truth) or ``"segmentation"`` (bags with
            instance truth and controls, no grade).
        split: ``"train"``, ``"val"`` or ``"test"`` (the splits of :mod:`.idrid`).
        task: the grading set's label, ``"referable"``, ``"grade"`` or ``"dme"`` (ignored for segmentation bags).
        lesions: the lesion types whose pixels make a tile positive (segmentation bags), e.g. ``"EX"``
            or ``"MA+HE+EX+SE"``.
        max_images: keep only the first ``max_images`` bags; ``None``: all. Photographs left out are
            neither read nor encoded.
        batch_size: tiles per encoder pass.
        **features: the fields of :class:`IDRiDBagSettings` (``size``, ``tile_px``, ...).

    Attributes:
        images: the underlying photograph data set; settings; label_names; image_ids (of the bags, in
            order); cache_folder; encoded (photographs encoded by this instance); feature_dim; grid_shape
            (rows, cols of the full tile grid).

    Raises:
        DataNotFoundError: no data folder given, or files missing under it.
        ValueError: a bad dataset, split, task, lesion list or feature setting, or a photograph without
            any field-of-view tile.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, dataset: str = "grading", split: str = "train",
                 task: str = "referable", lesions: str | Sequence[str] = _DEFAULT_LESIONS,
                 max_images: int | None = None, batch_size: int = 64, **features: Any) -> None:
        unknown = sorted(set(features) - set(IDRiDBagSettings.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown idrid_bags parameter(s) {unknown}; expected root, dataset, split, task, lesions, "
                             f"max_images, batch_size or one of {sorted(IDRiDBagSettings.__dataclass_fields__)}")
        if dataset not in ("grading", "segmentation"):
            raise ValueError(f"dataset must be 'grading' or 'segmentation', got {dataset!r}")
        if max_images is not None and max_images < 0:
            raise ValueError(f"max_images must be >= 0 or None, got {max_images}")
        self.settings = s = IDRiDBagSettings(**features)
        self.dataset, self.split, self.task, self.batch_size = dataset, split, task, batch_size
        self.lesions = _parse_lesions(lesions)
        self.images: IDRiDGrading | IDRiDSegmentation = (
            IDRiDGrading(root, split=split, size=s.size, task=task, prepare=False) if dataset == "grading"
            else IDRiDSegmentation(root, split=split, size=s.size, prepare=False))
        self.label_names = self.images.label_names if dataset == "grading" else ("unknown",)
        n = len(self.images) if max_images is None else min(max_images, len(self.images))
        self.image_ids = list(self.images.image_ids[:n])
        self._cache = TileFeatureCache(s, "idrid_bags", in_chans=3, batch_size=batch_size, version=_CACHE_VERSION)
        self.cache_folder = self._cache.folder / dataset / self.images.official_part
        h, w = self.images.shape
        self.grid_shape = (h // s.tile_px, w // s.tile_px)
        self._prior = _lesion_prior(root, s, self.lesions) if dataset == "segmentation" else None
        self.bags = [self._bag(i) for i in self._progress(range(n))]

    def _progress(self, items: Sequence[int]) -> Any:
        from tqdm.auto import tqdm

        return tqdm(items, desc=f"IDRiD bags ({self.dataset}/{self.split})", leave=False, mininterval=2.0, disable=None)

    # -- bags --------------------------------------------------------------------------------------
    def cache_path(self, index: int) -> Path:
        """The feature cache file of photograph ``index``."""
        return self.cache_folder / f"{self.image_ids[index]}{CACHE_SUFFIX}"

    def _features(self, index: int, tiles: FovTiles) -> torch.Tensor:
        """(N, D) features of the tiles of photograph ``index``: from the cache, else encoded and cached."""
        stamp = _photograph_stamp(self.images.files_read([self.image_ids[index]]))
        return self._cache.features(self.cache_path(index), "photograph", stamp, tiles.images, tiles.coords)

    def _bag(self, index: int) -> dict[str, Any]:
        s = self.settings
        sample = self.images[index]
        tiles = fov_tiles(sample["image"], sample["fov"], s.tile_px, s.min_fov_fraction)
        if tiles.coords.shape[0] == 0:
            raise ValueError(f"{sample['image_id']} has no tile with at least {s.min_fov_fraction:.0%} field of view "
                             f"at tile_px={s.tile_px}; lower min_fov_fraction or tile_px")
        bag: dict[str, Any] = {
            "feats": self._features(index, tiles),  # (N, D)
            "coords": tiles.coords,  # (N, 2)
            "label": sample["label"],
            "index": int(index),
            "patient_id": sample["patient_id"],
            "image_id": sample["image_id"],
        }
        if self.dataset == "segmentation":
            bag["instance_labels"] = self._instance_truth(sample, tiles)
            green, fov = sample["image"][1], sample["fov"]
            prior = self._prior if self._prior is not None else torch.zeros(self.grid_shape)  # set for segmentation
            bag["instance_controls"] = {
                "bright_pixels": _tile_max(green, fov, s.tile_px, tiles.keep),
                "dark_pixels": _tile_max(-green, fov, s.tile_px, tiles.keep),
                "lesion_prior": prior[tiles.keep].float(),
            }
        return bag

    def _instance_truth(self, sample: dict[str, Any], tiles: FovTiles) -> torch.Tensor:
        """(N,) 1 where a kept tile holds a pixel of an annotated lesion of ``self.lesions``."""
        return _lesion_grid(sample, self.lesions, self.settings.tile_px)[tiles.keep].float()


    def photograph(self, index: int, shrink: int = 4) -> tuple[torch.Tensor, int]:
        """Bag ``index``'s photograph shrunk ``shrink`` times (area average), to show its tiles on (a demo sample).

        Returns:
            ``(image, tile_px)``: (3, H / shrink, W / shrink) RGB on 8-bit levels in ``[0, 1]``, and the side of
            one tile on it in pixels (a tile at grid ``(row, col)`` covers rows ``row * tile_px`` onwards).
        """
        if shrink < 1 or self.settings.tile_px % shrink:
            raise ValueError(f"shrink must divide tile_px={self.settings.tile_px}, got {shrink}")
        image = self.images[index]["image"]
        small = F.avg_pool2d(image[None], shrink)[0]
        return (small * 255).round() / 255, self.settings.tile_px // shrink

    def finding_sets(self) -> dict[str, "IDRiDBags"]:
        """Per lesion type of ``lesions`` (when more than one), the same bags with that type's tile truth alone.

        Keyed by the lesion's name (``"hard_exudates"``...); the features come from the same cache and
        each set's ``lesion_prior`` control counts that type alone. Empty for grading bags.
        """
        if self.dataset != "segmentation" or len(self.lesions) < 2:
            return {}
        p = {"root": self.images.folder.parent, "dataset": self.dataset, "split": self.split,
             "max_images": len(self.bags), "batch_size": self.batch_size, **asdict(self.settings)}
        return {LESION_NAMES[c].replace(" ", "_"): IDRiDBags(lesions=c, **p) for c in self.lesions}

    @property
    def official_part(self) -> str:
        """The official IDRiD part the split is drawn from (``"train"`` or ``"test"``)."""
        return self.images.official_part

    def files_read(self, image_ids: Sequence[str] | None = None) -> list[Path]:
        """The data files of these photographs (default: the bags')."""
        return self.images.files_read(self.image_ids if image_ids is None else image_ids)

    def __repr__(self) -> str:
        return (f"IDRiDBags(dataset={self.dataset!r}, split={self.split!r}, n={len(self)}, settings={self.settings}, "
                f"cache={str(self.cache_folder)!r})")


def _lesion_grid(sample: dict[str, Any], lesions: Sequence[str], tile_px: int) -> torch.Tensor:
    """(rows, cols) bool: a grid position holds a pixel of an annotated lesion of ``lesions``."""
    rows = [LESIONS.index(c) for c in lesions]
    known = torch.as_tensor(sample["annotated"])[rows]
    mask = (torch.as_tensor(sample["mask"])[rows] & known[:, None, None]).any(0)  # (H, W)
    return F.max_pool2d(mask.float()[None, None], tile_px, tile_px)[0, 0] > 0


def _lesion_prior(root: str | os.PathLike[str] | None, settings: IDRiDBagSettings,
                  lesions: Sequence[str]) -> torch.Tensor:
    """(rows, cols) the share of segmentation training photographs whose tile at each position holds a lesion."""
    train = IDRiDSegmentation(root, split="train", size=settings.size)
    grids = [_lesion_grid(train[i], lesions, settings.tile_px).float() for i in range(len(train))]
    return torch.stack(grids).mean(0)


def _photograph_stamp(paths: Sequence[Path]) -> list[Any]:
    """What identifies the photograph file a bag was encoded from (name, size, modification time)."""
    image = [p for p in paths if p.suffix.lower() in (".jpg", ".jpeg")][:1] or list(paths[:1])
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in image]


def idrid_bag_splits(params: dict[str, Any], sizes: dict[str, int | None]) -> dict[str, Any]:
    """The description of an ``idrid_bags`` data spec without encoding anything (for :func:`describe`).

    Args:
        params: the spec's parameters (``root``, ``dataset``, ``task``, the feature settings...).
        sizes: split -> the number of photographs kept (``None``: all).

    Returns:
        ``{"splits": {split: {"size", "official_part", "image_ids"}}, "source": {...}}`` in the form of the
        ``idrid`` kind's description, with the feature settings.
    """
    from mlmi_zoo.training.datasets.idrid import source_checksums

    p = dict(params)
    root, dataset, task = p.pop("root", None), p.pop("dataset", "grading"), p.pop("task", "referable")
    lesions = _parse_lesions(p.pop("lesions", _DEFAULT_LESIONS))
    for key in ("max_images", "batch_size"):
        p.pop(key, None)
    settings = IDRiDBagSettings(**p)
    out: dict[str, Any] = {"splits": {}, "source": {}}
    read: list[Path] = []
    for split, n in sizes.items():
        ds = (IDRiDGrading(root, split=split, size=settings.size, task=task, prepare=False) if dataset == "grading"
              else IDRiDSegmentation(root, split=split, size=settings.size, prepare=False))
        used = list(ds.image_ids[: n if n is not None else len(ds)])
        out["splits"][split] = {"size": len(used), "official_part": ds.official_part, "image_ids": used}
        read += ds.files_read(used)
        out["source"] = {"folder": ds.folder.name, "set": ds.set_name, **source_checksums(ds.folder, read),
                         "features": asdict(settings), **({"lesions": "+".join(lesions)} if dataset == "segmentation"
                                                          else {})}
    return out

"""Whole-slide images as bags of tiles, and per-slide feature caches for attention MIL.

The pipeline follows the common practice of weakly supervised computational pathology (CLAM,
Lu et al., Nature Biomedical Engineering 2021; Ilse et al. 2018 for the MIL model): cut the tissue
into non-overlapping tiles, drop background, encode each tile once with a frozen encoder, and train
on bags of cached features. What we changed: tiles are read by region straight from the TIFF
(memory-mapped when the file is uncompressed, segment by segment otherwise) with ``tifffile`` —
OpenSlide is optional and only used for files ``tifffile`` cannot decode; tissue is detected with a
plain saturation threshold per tile (no Otsu, no contours); one ``safetensors`` file per slide holds
fp16 features, integer grid coordinates and JSON metadata — no HDF5, no pickle.

Coordinates are **grid** coordinates ``(row, col)`` of a tile in units of ``tile_size`` at the tiled
level; ``TiledSlide.pixel_coords`` gives the top-left pixel ``(y, x)``.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset

from mlmi_zoo.units import convert

logger = logging.getLogger(__name__)

CACHE_SUFFIX = ".safetensors"
_META_KEY = "mlmi_zoo"  # safetensors header metadata key holding our JSON


# --------------------------------------------------------------------------------------------------
# region readers
# --------------------------------------------------------------------------------------------------
class SlideError(ValueError):
    """The slide was read but does not fit the request (level out of range, not 8-bit)."""


class _TiffRegionReader:
    """Reads rectangular regions of one pyramid level of a TIFF without loading the whole level."""

    def __init__(self, path: Path, level: int) -> None:
        import tifffile

        self.path = path
        self._tif = tifffile.TiffFile(path)
        try:
            series = self._tif.series[0]
            if not 0 <= level < len(series.levels):
                raise SlideError(f"{path}: level {level} requested, the file has levels 0..{len(series.levels) - 1}")
            self.page = series.levels[level].pages[0]
            self.level0_page = series.levels[0].pages[0]
            if self.page.dtype != np.uint8:
                raise SlideError(f"{path}: expected 8-bit RGB/gray tiles, got dtype {self.page.dtype}")
            _, _, self.height, self.width, _ = self.page.shaped  # (S, D, H, W, C) normalised TIFF shape
            self._memmap = None
            if self.page.is_memmappable:
                self._memmap = self.page.asarray(out="memmap").reshape(self.page.shaped)
        except Exception:
            self._tif.close()
            raise

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.height), int(self.width)

    def close(self) -> None:
        self._memmap = None
        self._tif.close()

    def microns_per_pixel_level0(self) -> float | None:
        """Pixel size of level 0 from the TIFF resolution tags or an Aperio ``MPP =`` description."""
        page = self.level0_page
        m = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
        if m:
            return float(m.group(1))
        unit = {2: "inch", 3: "cm"}.get(int(page.resolutionunit))
        xres = page.resolution[0] if page.resolution else 0
        if unit is None or not xres or xres == 1:
            return None  # no physical resolution stored
        return float(convert(1.0 / xres, unit, "um"))

    def read_region(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Return the region as uint8 ``(h, w, 3)`` RGB."""
        if self._memmap is not None:
            region = np.asarray(self._memmap[:, 0, y:y + h, x:x + w, :])  # (S, h, w, C)
        else:
            region = self._decode_region(y, x, h, w)
        region = rearrange(region, "s h w c -> h w (s c)")
        if region.shape[-1] == 1:
            region = np.repeat(region, 3, axis=-1)
        return np.ascontiguousarray(region[..., :3])  # drop alpha

    def _segment_indices(self, y: int, x: int, h: int, w: int) -> list[int]:
        page = self.page
        samples_sep = page.shaped[0]
        if page.is_tiled:
            tl, tw = page.tilelength, page.tilewidth
            ny, nx = math.ceil(self.height / tl), math.ceil(self.width / tw)
            rows = range(y // tl, (y + h - 1) // tl + 1)
            cols = range(x // tw, (x + w - 1) // tw + 1)
            return [s * ny * nx + r * nx + c for s in range(samples_sep) for r in rows for c in cols]
        rps = min(page.rowsperstrip or self.height, self.height)
        nstrips = math.ceil(self.height / rps)
        return [s * nstrips + r for s in range(samples_sep) for r in range(y // rps, (y + h - 1) // rps + 1)]

    def _decode_region(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        page = self.page
        out = np.zeros((page.shaped[0], h, w, page.shaped[4]), dtype=np.uint8)  # (S, h, w, C)
        fh = self._tif.filehandle
        for index in self._segment_indices(y, x, h, w):
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            data = None
            if count:
                fh.seek(offset)
                data = fh.read(count)
            segment, (s, _, sy, sx, _), _ = page.decode(data, index, jpegtables=page.jpegtables)
            if segment is None:  # empty segment: stays zero
                continue
            seg = segment[0]  # (l, w, C)
            y0, y1 = max(y, sy), min(y + h, sy + seg.shape[0], self.height)
            x0, x1 = max(x, sx), min(x + w, sx + seg.shape[1], self.width)
            if y0 < y1 and x0 < x1:
                out[s, y0 - y:y1 - y, x0 - x:x1 - x] = seg[y0 - sy:y1 - sy, x0 - sx:x1 - sx]
        return out


class _OpenSlideRegionReader:
    """Fallback for slide formats ``tifffile`` cannot decode (needs ``openslide-python``)."""

    def __init__(self, path: Path, level: int) -> None:
        import openslide

        self._slide = openslide.OpenSlide(str(path))
        if not 0 <= level < self._slide.level_count:
            raise SlideError(f"{path}: level {level} requested, the slide has levels 0..{self._slide.level_count - 1}")
        self.level = level
        self._down = self._slide.level_downsamples[level]

    @property
    def shape(self) -> tuple[int, int]:
        w, h = self._slide.level_dimensions[self.level]
        return int(h), int(w)

    def close(self) -> None:
        self._slide.close()

    def microns_per_pixel_level0(self) -> float | None:
        value = self._slide.properties.get("openslide.mpp-x")
        return float(value) if value else None

    def read_region(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        # OpenSlide takes level-0 coordinates (x, y) and a size (w, h) at the level
        loc = (int(round(x * self._down)), int(round(y * self._down)))
        rgba = np.asarray(self._slide.read_region(loc, self.level, (w, h)))
        return np.ascontiguousarray(rgba[..., :3])


def _open_reader(path: Path, level: int) -> _TiffRegionReader | _OpenSlideRegionReader:
    import tifffile

    try:
        reader = _TiffRegionReader(path, level)
        reader.read_region(0, 0, 1, 1)  # fail now, not mid-slide, if the codec is missing
        return reader
    except SlideError:
        raise
    except (tifffile.TiffFileError, NotImplementedError, ValueError, KeyError) as err:
        try:
            import openslide  # noqa: F401
        except ImportError:
            raise ValueError(
                f"{path}: tifffile cannot read this slide ({type(err).__name__}: {err}); install the missing codec "
                f"(pip install imagecodecs) or OpenSlide (pip install 'mlmi-zoo[wsi]')"
            ) from err
        logger.info("tifffile cannot read %s (%s); using OpenSlide", path, err)
        return _OpenSlideRegionReader(path, level)


# --------------------------------------------------------------------------------------------------
# tiling
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TiledSlide:
    """The tissue tiles of one slide level; pixels are read on demand.

    Args:
        path: slide file.
        level: pyramid level that was tiled (0 = full resolution).
        tile_size: tile side in pixels at ``level``.
        coords: int64 ``(N, 2)`` grid coordinates ``(row, col)`` of the kept tiles.
        tissue_fraction: float32 ``(N,)`` share of non-background pixels in each kept tile.
        level_shape: ``(height, width)`` of ``level`` in pixels.
        grid_shape: ``(rows, cols)`` of the full tile grid (kept and dropped tiles).
        microns_per_pixel: pixel size at ``level`` in µm, or ``None`` when unknown.
    """

    path: str
    level: int
    tile_size: int
    coords: np.ndarray  # (N, 2) int64 (row, col)
    tissue_fraction: np.ndarray  # (N,) float32
    level_shape: tuple[int, int]
    grid_shape: tuple[int, int]
    microns_per_pixel: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def pixel_coords(self) -> np.ndarray:
        """Top-left pixel ``(y, x)`` of each tile at ``level``, int64 ``(N, 2)``."""
        return self.coords * self.tile_size

    def iter_tiles(self, indices: Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """Yield the tiles (uint8 ``(tile_size, tile_size, 3)`` RGB) in ``coords`` order, read lazily."""
        reader = _open_reader(Path(self.path), self.level)
        try:
            for i in range(len(self)) if indices is None else indices:
                y, x = (int(v) for v in self.coords[i] * self.tile_size)
                yield reader.read_region(y, x, self.tile_size, self.tile_size)
        finally:
            reader.close()

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary, used as the metadata of a feature cache."""
        return {
            "slide_path": self.path,
            "slide_id": slide_id_of(self.path),
            "level": self.level,
            "tile_size": self.tile_size,
            "num_tiles": len(self),
            "level_shape": list(self.level_shape),
            "grid_shape": list(self.grid_shape),
            "microns_per_pixel": self.microns_per_pixel,
            **self.meta,
        }


def background_fraction(tiles: np.ndarray, saturation_threshold: float = 0.08) -> np.ndarray:
    """Share of background pixels per tile: pixels whose HSV saturation is below ``saturation_threshold``.

    White glass, grey shadows and black padding all have low saturation; stained tissue does not.

    Args:
        tiles: uint8 ``(N, T, T, 3)`` RGB.
        saturation_threshold: in ``[0, 1]``.

    Returns:
        float32 ``(N,)`` in ``[0, 1]``.
    """
    t = tiles.astype(np.int16)
    mx, mn = t.max(-1), t.min(-1)  # (N, T, T)
    saturation = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0.0)
    return (saturation < saturation_threshold).mean(axis=(1, 2)).astype(np.float32)


def tile_slide(
    path: str | Path,
    tile_size: int = 256,
    level: int = 0,
    background_threshold: float = 0.75,
    microns_per_pixel: float | None = None,
    saturation_threshold: float = 0.08,
) -> TiledSlide:
    """Cut one slide level into non-overlapping tiles and keep those that show tissue.

    The level is read one row of tiles at a time, so memory stays at ``tile_size x width`` pixels.
    Incomplete tiles at the right and bottom borders are not kept.

    Args:
        path: TIFF / BigTIFF / pyramidal TIFF (SVS) file; other formats need OpenSlide.
        tile_size: tile side in pixels at ``level``.
        level: pyramid level to tile (0 = full resolution).
        background_threshold: a tile is dropped when more than this share of its pixels is background.
        microns_per_pixel: pixel size of **level 0** in µm; ``None`` reads it from the file
            (resolution tags or Aperio ``MPP``), leaving it ``None`` when the file has none.
        saturation_threshold: HSV saturation under which a pixel counts as background.

    Returns:
        A :class:`TiledSlide` with the grid coordinates of the kept tiles.

    Raises:
        FileNotFoundError: no such file.
        ValueError: bad parameters, or a file neither tifffile nor OpenSlide can read.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"slide not found: {str(p)!r}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be a positive number of pixels, got {tile_size}")
    if not 0.0 <= background_threshold <= 1.0:
        raise ValueError(f"background_threshold is a share of pixels in [0, 1], got {background_threshold}")
    if microns_per_pixel is not None and not microns_per_pixel > 0:
        raise ValueError(f"microns_per_pixel must be positive, got {microns_per_pixel}")
    reader = _open_reader(p, level)
    try:
        height, width = reader.shape
        rows, cols = height // tile_size, width // tile_size
        mpp0 = microns_per_pixel if microns_per_pixel is not None else reader.microns_per_pixel_level0()
        kept: list[np.ndarray] = []
        fractions: list[np.ndarray] = []
        for r in range(rows):
            strip = reader.read_region(r * tile_size, 0, tile_size, cols * tile_size)  # (T, cols*T, 3)
            tiles = rearrange(strip, "ty (nx tx) c -> nx ty tx c", tx=tile_size)
            bg = background_fraction(tiles, saturation_threshold)  # (cols,)
            keep = np.flatnonzero(bg <= background_threshold)
            kept.append(np.stack([np.full_like(keep, r), keep], axis=1))
            fractions.append(1.0 - bg[keep])
        level0_width = _level0_width(reader)
    finally:
        reader.close()
    coords = np.concatenate(kept).astype(np.int64) if kept else np.zeros((0, 2), np.int64)
    tissue = np.concatenate(fractions).astype(np.float32) if fractions else np.zeros(0, np.float32)
    mpp = None if mpp0 is None else float(mpp0) * level0_width / width  # pixel size grows with downsampling
    logger.info("%s: kept %d of %d tiles", p.name, len(coords), rows * cols)
    return TiledSlide(
        path=str(p), level=level, tile_size=tile_size, coords=coords, tissue_fraction=tissue,
        level_shape=(height, width), grid_shape=(rows, cols), microns_per_pixel=mpp,
        meta={"background_threshold": background_threshold, "saturation_threshold": saturation_threshold},
    )


def _level0_width(reader: _TiffRegionReader | _OpenSlideRegionReader) -> int:
    if isinstance(reader, _TiffRegionReader):
        return int(reader.level0_page.shaped[3])
    return int(reader._slide.level_dimensions[0][0])


# --------------------------------------------------------------------------------------------------
# encoding and caching
# --------------------------------------------------------------------------------------------------
def encode_tiles(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    tiles_iter: Iterable[np.ndarray | torch.Tensor],
    batch_size: int = 64,
    device: str | torch.device | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Encode tiles into feature vectors in chunks of ``batch_size``, without gradients.

    Args:
        encoder: maps a float batch ``(B, 3, T, T)`` to features ``(B, D)`` (put it in ``eval()`` mode first).
        tiles_iter: uint8 ``(T, T, 3)`` arrays (as :meth:`TiledSlide.iter_tiles` yields) or float
            ``(3, T, T)`` tensors already in network range.
        batch_size: tiles per forward pass.
        device: where to run the encoder; default: the device of its first parameter, else CPU.
        transform: optional batch transform after scaling to ``[0, 1]`` (e.g. ImageNet normalisation).

    Returns:
        float32 ``(N, D)`` features on the CPU, in the order of ``tiles_iter``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        params = list(encoder.parameters()) if isinstance(encoder, torch.nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    feats: list[torch.Tensor] = []

    def run(batch: list[torch.Tensor]) -> None:
        x = torch.stack(batch).to(device)  # (B, 3, T, T)
        if transform is not None:
            x = transform(x)
        with torch.inference_mode():
            f = encoder(x)
        if f.ndim != 2 or f.shape[0] != x.shape[0]:
            raise ValueError(f"encoder must return (B, D) features, got shape {tuple(f.shape)} for a batch of {x.shape[0]}")
        feats.append(f.detach().float().cpu())

    batch: list[torch.Tensor] = []
    for tile in tiles_iter:
        if isinstance(tile, np.ndarray):
            if tile.dtype != np.uint8 or tile.ndim != 3:
                raise ValueError(f"expected uint8 (T, T, 3) tiles, got {tile.dtype} {tile.shape}")
            tile = torch.from_numpy(tile).permute(2, 0, 1).float() / 255.0  # (3, T, T)
        batch.append(tile)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    if not feats:
        raise ValueError("no tiles to encode (is the slide all background? lower background_threshold)")
    return torch.cat(feats)


@dataclass(frozen=True, eq=False)
class CachedFeatures:
    """Features of one slide as stored on disk.

    Args:
        feats: float16 ``(N, D)``.
        coords: int64 ``(N, 2)`` grid coordinates ``(row, col)``.
        meta: the JSON metadata stored with them.
    """

    feats: torch.Tensor  # (N, D) float16
    coords: torch.Tensor  # (N, 2) int64
    meta: dict[str, Any]


def slide_id_of(path: str | Path) -> str:
    """Slide id = file name without the slide or cache extension."""
    name = Path(path).name
    return name[: -len(CACHE_SUFFIX)] if name.endswith(CACHE_SUFFIX) else Path(name).stem


def cache_features(
    features: torch.Tensor | np.ndarray,
    coords: torch.Tensor | np.ndarray,
    path: str | Path,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write one slide's features as a safetensors file: fp16 ``feats``, int64 ``coords``, JSON metadata.

    Args:
        features: ``(N, D)`` floats; stored as float16 (values beyond ±65504 are refused).
        coords: ``(N, 2)`` integer grid coordinates.
        path: output file; ``.safetensors`` is appended when missing.
        meta: JSON-serialisable metadata (encoder name, tile size, µm per pixel, ...).

    Returns:
        The path written.
    """
    feats = torch.as_tensor(features)
    xy = torch.as_tensor(coords)
    if feats.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(feats.shape)}")
    if xy.ndim != 2 or xy.shape != (feats.shape[0], 2):
        raise ValueError(f"coords must be ({feats.shape[0]}, 2) to match the features, got {tuple(xy.shape)}")
    if xy.is_floating_point() and not torch.equal(xy, xy.round()):
        raise ValueError("coords must be integer grid coordinates, got fractional values")
    if not torch.isfinite(feats).all():
        raise ValueError("features contain NaN or Inf")
    if feats.numel() and feats.abs().max() > torch.finfo(torch.float16).max:
        raise ValueError(
            f"features reach {float(feats.abs().max()):.4g}, beyond float16's range (65504); normalise them first"
        )
    try:
        meta_json = json.dumps(dict(meta or {}), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta must be JSON-serialisable (numbers, strings, lists, dicts): {err}") from err
    from safetensors.torch import save_file

    out = Path(path)
    if not out.name.endswith(CACHE_SUFFIX):
        out = out.with_name(out.name + CACHE_SUFFIX)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(
        {"feats": feats.detach().cpu().to(torch.float16).contiguous(), "coords": xy.detach().cpu().to(torch.int64).contiguous()},
        str(tmp),
        metadata={_META_KEY: meta_json, "format_version": "1"},
    )
    os.replace(tmp, out)  # a reader never sees a half-written cache
    return out


def load_cached_features(path: str | Path) -> CachedFeatures:
    """Read a file written by :func:`cache_features`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file lacks ``feats`` / ``coords`` or our metadata.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"feature cache not found: {str(p)!r}")
    with safe_open(str(p), framework="pt") as f:
        keys = set(f.keys())
        header = f.metadata() or {}
        if not {"feats", "coords"} <= keys or _META_KEY not in header:
            raise ValueError(
                f"{p}: not an mlmi-zoo feature cache (tensors {sorted(keys)}, metadata keys {sorted(header)}); "
                f"expected tensors 'feats' and 'coords' and metadata {_META_KEY!r}, as written by cache_features"
            )
        return CachedFeatures(f.get_tensor("feats"), f.get_tensor("coords"), json.loads(header[_META_KEY]))


class CachedBagDataset(Dataset):
    """Bags of cached tile features with slide-level labels, for attention MIL.

    Each item: ``{"feats": float32 (N, D), "coords": int64 (N, 2), "label": int64 scalar,
    "index": int, "slide_id": str}``.

    Args:
        dir_or_files: a folder of ``*.safetensors`` caches, or a list of cache files.
        labels: ``{slide_id: label}`` or a CSV path with columns ``slide_id`` and ``label``; labels are
            class indices or class names.
        label_names: class names in index order; default: ``"0".."K-1"`` for integer labels, sorted
            names for string labels.

    Raises:
        ValueError: no caches found, or caches without a label (all listed in one message), or labels
            not in ``label_names``.
    """

    def __init__(
        self,
        dir_or_files: str | Path | Sequence[str | Path],
        labels: Mapping[str, int | str] | str | Path,
        label_names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(dir_or_files, (str, Path)):
            folder = Path(dir_or_files)
            if not folder.is_dir():
                raise FileNotFoundError(f"feature cache folder not found: {str(folder)!r}")
            files = sorted(folder.glob(f"*{CACHE_SUFFIX}"))
        else:
            files = [Path(f) for f in dir_or_files]
        if not files:
            raise ValueError(f"no {CACHE_SUFFIX} feature caches in {dir_or_files!r}")
        label_map = _read_label_csv(Path(labels)) if isinstance(labels, (str, Path)) else dict(labels)
        self.files = files
        self.slide_ids = [slide_id_of(f) for f in files]
        unlabeled = [s for s in self.slide_ids if s not in label_map]
        if unlabeled:
            raise ValueError(f"{len(unlabeled)} feature caches have no label: {unlabeled[:20]}; add them to the labels")
        values = [label_map[s] for s in self.slide_ids]
        self.label_names, self.labels = _encode_labels(values, label_names)
        extra = sorted(set(label_map) - set(self.slide_ids))
        if extra:
            logger.warning("%d labelled slides have no feature cache, e.g. %s", len(extra), extra[:5])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cached = load_cached_features(self.files[index])
        return {
            "feats": cached.feats.float(),  # (N, D)
            "coords": cached.coords.long(),  # (N, 2)
            "label": torch.tensor(self.labels[index], dtype=torch.int64),
            "index": int(index),
            "slide_id": self.slide_ids[index],
        }


def _read_label_csv(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"label CSV not found: {str(path)!r}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"slide_id", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns 'slide_id' and 'label', got {reader.fieldnames}")
        return {row["slide_id"].strip(): row["label"].strip() for row in reader}


def _encode_labels(values: Sequence[int | str], label_names: Sequence[str] | None) -> tuple[tuple[str, ...], list[int]]:
    """Map labels given as indices or names to indices; return (label_names, indices)."""
    as_int = [int(v) if isinstance(v, (int, np.integer)) or str(v).lstrip("-").isdigit() else None for v in values]
    if label_names is not None:
        names = tuple(label_names)
        out, bad = [], []
        for v, i in zip(values, as_int):
            if str(v) in names:
                out.append(names.index(str(v)))
            elif i is not None and 0 <= i < len(names):
                out.append(i)
            else:
                bad.append(v)
        if bad:
            raise ValueError(f"labels {sorted(set(map(str, bad)))} are not in label_names {names}")
        return names, out
    if all(i is not None for i in as_int):
        if min(as_int) < 0:
            raise ValueError(f"integer labels must be >= 0, got {min(as_int)}")
        return tuple(str(k) for k in range(max(as_int) + 1)), [int(i) for i in as_int]
    names = tuple(sorted({str(v) for v in values}))
    return names, [names.index(str(v)) for v in values]

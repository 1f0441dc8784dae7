"""Reading IDRiD's files and caching their resized copies: what the IDRiD data sets (:mod:`.idrid`) stand on.

CSV rows checked against their header, the photographs decoded at 1/4 of the camera frame (JPEG
draft mode, or the stored grading size), masks at full resolution, resized copies written
atomically (temporary file, then rename) and rebuilt when the signature of their source files
(name, size, modification time, cache version) changes, and the checksums a data description
records. Data: Porwal et al., Data 3(3):25, 2018 (CC BY 4.0).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Sequence, cast

import numpy as np
import torch

from mlmi_zoo.training.datasets._location import DataNotFoundError

__all__ = ["ORIGINAL_HW", "STORED_GRADING_HW", "source_checksums"]

logger = logging.getLogger(__name__)

ORIGINAL_HW = (2848, 4288)  # rows, columns of the camera frame
STORED_GRADING_HW = (712, 1072)  # the grading JPEGs as stored: 1/4 of the frame
_CACHE_VERSION = 1  # part of every cache entry's signature: raise it whenever what is cached changes
_HINT = ("IDRiD is published at https://idrid.grand-challenge.org (CC BY 4.0); put it in <data>/idrid with "
         "grading/, segmentation/ and localization/ as unpacked there; this library never downloads data")


def _pool(arrays: np.ndarray, hw: tuple[int, int], how: str) -> np.ndarray:
    """``(C, h, w)`` -> ``(C, H, W)`` by adaptive average or max pooling (the same bins for both)."""
    x = torch.from_numpy(np.ascontiguousarray(arrays, dtype=np.float32))[None]
    pooled = (torch.nn.functional.adaptive_avg_pool2d(x, hw) if how == "mean"
              else torch.nn.functional.adaptive_max_pool2d(x, hw))
    return pooled[0].numpy()


def _resize_image(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.clip(np.rint(_pool(rgb.transpose(2, 0, 1), hw, "mean")), 0, 255).astype(np.uint8)  # (3, H, W)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def _rows(path: Path, header: Sequence[str]) -> list[list[str]]:
    """The non-empty rows of an IDRiD CSV (padded with empty columns and rows), header checked."""
    if not path.is_file():
        raise DataNotFoundError(f"{path} not found; the IDRiD folder is incomplete. {_HINT}")
    rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    found = [c.strip() for c in rows[0][: len(header)]] if rows else []
    if found != list(header):
        raise ValueError(f"{path}: expected the header to start with {list(header)}, got {found}")
    out = []
    for number, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        if len(row) < len(header) or not re.fullmatch(r"IDRiD_\d+", row[0].strip()):
            raise ValueError(f"{path}: row {number} is {row[:len(header)]}, expected an image id IDRiD_NNN and "
                             f"{len(header) - 1} numbers")
        out.append([c.strip() for c in row[: len(header)]])
    return out


def _int(path: Path, value: str, column: str, lo: int, hi: int) -> int:
    if not re.fullmatch(r"\d+", value) or not lo <= int(value) <= hi:
        raise ValueError(f"{path}: {column} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _signature(paths: Sequence[Path | None]) -> str:
    """What a cached entry was built from: (name, bytes, modification time) of each source file."""
    sig: list[list[str | int] | None] = []
    for p in paths:
        if p is not None and not p.is_file():
            raise DataNotFoundError(f"{p} not found; the IDRiD folder is incomplete. {_HINT}")
        sig.append(None if p is None else [p.name, p.stat().st_size, p.stat().st_mtime_ns])
    return json.dumps([_CACHE_VERSION, sig])


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file in its folder and an atomic rename: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # numpy's stub types **kwds like its allow_pickle flag; the names here are array names only
    named = cast(dict[str, Any], arrays)
    _atomic_write(path, lambda fh: np.savez_compressed(fh, **named))


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _is_current(path: Path, signature: str) -> bool:
    """The cached entry exists, is readable and was built from the same source files."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["signature"]) == signature
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False


def _load_or_build(path: Path, signature: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The cached entry at ``path``; built (and cached) first when it is absent, unreadable or stale."""
    try:
        entry = _load(path)
        if str(entry["signature"]) == signature:
            return entry
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    entry = {**build(), "signature": np.array(signature)}
    _save(path, entry)
    return entry


def _read_rgb(path: Path) -> np.ndarray:
    """A photograph (full 4288 x 2848 frame or its 1/4, 1072 x 712) decoded on the 1072 x 712 frame.

    A full-resolution JPEG is decoded at 1/4 scale by the JPEG decoder itself (libjpeg's scaled
    inverse DCT through PIL's ``draft``): the same frame as the stored grading photographs, at a
    fraction of the cost of decoding 12 megapixels and averaging them.
    """
    from PIL import Image

    if not path.is_file():
        raise DataNotFoundError(f"{path} not found; the IDRiD folder is incomplete. {_HINT}")
    with Image.open(path) as im:
        if (im.height, im.width) not in (ORIGINAL_HW, STORED_GRADING_HW):
            raise ValueError(f"{path}: expected a {ORIGINAL_HW[1]} x {ORIGINAL_HW[0]} photograph or its 1/4 "
                             f"({STORED_GRADING_HW[1]} x {STORED_GRADING_HW[0]}), got {im.width} x {im.height}")
        im.draft("RGB", (STORED_GRADING_HW[1], STORED_GRADING_HW[0]))
        rgb = np.asarray(im.convert("RGB"))
    if rgb.shape[:2] != STORED_GRADING_HW:
        raise ValueError(f"{path}: decoded at {rgb.shape[1]} x {rgb.shape[0]}, expected the 1/4 frame "
                         f"{STORED_GRADING_HW[1]} x {STORED_GRADING_HW[0]}")
    return rgb


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        mask = np.asarray(im) if im.mode == "1" else np.asarray(im.convert("L")) > 0  # the published masks are 1-bit
    if mask.shape != ORIGINAL_HW:
        raise ValueError(f"{path}: expected a {ORIGINAL_HW[1]} x {ORIGINAL_HW[0]} mask, got "
                         f"{mask.shape[1]} x {mask.shape[0]}")
    return mask


def _prepare(entries: Sequence[tuple[Path, str]], build: Callable[[int], dict[str, np.ndarray]], what: str) -> None:
    """Build every cache entry that is absent or stale now, with a progress bar."""
    from tqdm.auto import tqdm

    missing = [i for i, (path, signature) in enumerate(entries) if not _is_current(path, signature)]
    if not missing:
        return
    logger.info("caching %d resized IDRiD %s images under %s", len(missing), what, entries[missing[0]][0].parent)
    for i in tqdm(missing, desc=f"caching IDRiD {what}", leave=False, mininterval=2.0, disable=None):
        _save(entries[i][0], {**build(i), "signature": np.array(entries[i][1])})



def source_checksums(folder: Path, files: Sequence[Path]) -> dict[str, Any]:
    """Checksums of the IDRiD files a spec read: the MD5 of each CSV and one digest of the whole listing.

    Args:
        folder: the ``idrid`` folder.
        files: the files read (duplicates are counted once).

    Returns:
        ``{"num_files", "md5_of_listing"`` (sha256 of the sorted ``[relative path, md5]`` list, the same
        MD5s as the data set's ``MD5SUMS``)``, "csv_md5": {relative path: md5}}``.
    """
    from mlmi_zoo.training.datasets.medmnist import file_md5

    listing = sorted({(p.relative_to(folder).as_posix(), file_md5(p)) for p in files})
    return {"num_files": len(listing),
            "md5_of_listing": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
            "csv_md5": {name: md5 for name, md5 in listing if name.endswith(".csv")}}

"""Reading rectangular regions of one pyramid level of a whole-slide image, without loading the level.

Part of the slide pipeline (see :mod:`.slides`). What we changed with respect to the common practice
of reading slides through OpenSlide (CLAM, Lu et al., Nature Biomedical Engineering 2021): regions are
read straight from the TIFF with ``tifffile`` — memory-mapped when the file is uncompressed, segment by
segment otherwise — and OpenSlide is optional, used only for files ``tifffile`` cannot decode.
"""
from __future__ import annotations

import importlib
import logging
import math
import re
from pathlib import Path

import numpy as np
from einops import rearrange

from mlmi_zoo.units import convert

__all__ = ["RegionReader", "SlideError", "open_region_reader"]

logger = logging.getLogger(__name__)


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
            page, level0_page = series.levels[level].pages[0], series.levels[0].pages[0]
            # tifffile types a series' pages as TiffPage | TiffFrame | None; a level's first page is its keyframe
            if not (isinstance(page, tifffile.TiffPage) and isinstance(level0_page, tifffile.TiffPage)):
                raise tifffile.TiffFileError(f"{path}: expected each pyramid level to start with a TiffPage, got a "
                                             f"{type(page).__name__} and a {type(level0_page).__name__}")
            self.page, self.level0_page = page, level0_page
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

    def level0_width(self) -> int:
        """Width of level 0 in pixels (the pixel size of other levels scales with it)."""
        return int(self.level0_page.shaped[3])

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
        # an optional dependency (the `wsi` extra), imported by name so that the type check does not need it
        openslide = importlib.import_module("openslide")

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

    def level0_width(self) -> int:
        """Width of level 0 in pixels (the pixel size of other levels scales with it)."""
        return int(self._slide.level_dimensions[0][0])

    def microns_per_pixel_level0(self) -> float | None:
        value = self._slide.properties.get("openslide.mpp-x")
        return float(value) if value else None

    def read_region(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        # OpenSlide takes level-0 coordinates (x, y) and a size (w, h) at the level
        loc = (int(round(x * self._down)), int(round(y * self._down)))
        rgba = np.asarray(self._slide.read_region(loc, self.level, (w, h)))
        return np.ascontiguousarray(rgba[..., :3])


RegionReader = _TiffRegionReader | _OpenSlideRegionReader  # what open_region_reader returns


def open_region_reader(path: Path, level: int) -> RegionReader:
    """A reader of ``path`` at pyramid ``level``: tifffile, else OpenSlide when tifffile cannot decode it.

    Raises:
        SlideError: the level does not exist, or the pixels are not 8-bit.
        ValueError: neither tifffile nor OpenSlide can read the file (the message says what to install).
    """
    import tifffile

    try:
        reader = _TiffRegionReader(path, level)
        reader.read_region(0, 0, 1, 1)  # fail now, not mid-slide, if the codec is missing
        return reader
    except SlideError:
        raise
    except (tifffile.TiffFileError, NotImplementedError, ValueError, KeyError) as err:
        try:
            importlib.import_module("openslide")
        except ImportError:
            raise ValueError(
                f"{path}: tifffile cannot read this slide ({type(err).__name__}: {err}); install the missing codec "
                f"(pip install imagecodecs) or OpenSlide (pip install 'mlmi-zoo[wsi]')"
            ) from err
        logger.info("tifffile cannot read %s (%s); using OpenSlide", path, err)
        return _OpenSlideRegionReader(path, level)

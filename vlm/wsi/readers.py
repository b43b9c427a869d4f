"""Pixel readers behind `Slide.read_region_array`: OpenSlide for every format, tifffile where it is faster.

OpenSlide reads every vendor format but pays for its generality on each tile: a cairo composite into
premultiplied ARGB, a tile cache and a PIL round trip. For the formats whose tiles are plain TIFF tiles
(OpenSlide's `generic-tiff` and `aperio` vendors: pyramidal TIFF and SVS), `TiffTileReader` reads the
compressed bytes of only the tiles a region touches (`os.pread`: no shared file position, so one handle
serves many threads) and decodes them with tifffile's own decoder (imagecodecs' libjpeg-turbo, the library
OpenSlide's JPEG path uses too). OpenSlide still opens every slide: it gives the levels, the properties and
the µm/px, and it reads whatever the tifffile reader does not (a level-0 location that does not fall on a
whole pixel of the level, e.g. SVS levels with downsamples of 4.0007).

`resolve_reader` is the one place that decides what `--reader auto` means for a slide.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vlm.errors import InputError, UsageError
from vlm.settings import READERS

log = logging.getLogger(__name__)

# OpenSlide vendors whose pyramid levels are tiled TIFF pages, read by OpenSlide with libtiff and nothing else
# (no overlaps, no stitching): https://openslide.org/formats/ (generic tiled TIFF, Aperio SVS)
TIFF_VENDORS = ("generic-tiff", "aperio")
# TIFF compressions tifffile decodes with the same libraries OpenSlide uses: none, LZW, deflate, JPEG
_COMPRESSIONS = (1, 5, 7, 8, 32946)
_PHOTOMETRICS = (2, 6)  # RGB, YCbCr
DECODE_THREADS = min(4, os.cpu_count() or 1)  # per handle, for regions over several tiles


class ReaderUnavailableError(InputError):
    """The requested reader cannot read this slide (explicit `--reader` only; `auto` falls back)."""


def check_reader(reader: str) -> str:
    """`reader` if it is one of READERS, else a ValueError listing them."""
    if reader not in READERS:
        raise UsageError(f"`reader` must be one of {', '.join(READERS)}; got {reader!r}")
    return reader


class TiffTileReader:
    """Regions of the tiled pages of a TIFF, as RGB uint8 arrays, white outside the image.

    `levels` are the (width, height) of OpenSlide's levels: each must be a tiled RGB page of the file, or the
    constructor raises ReaderUnavailableError saying which. Thread-safe: reads are `os.pread` calls and
    decoding keeps no state.
    """

    def __init__(
        self, path: str | os.PathLike[str], levels: tuple[tuple[int, int], ...], threads: int = DECODE_THREADS
    ) -> None:
        import tifffile

        self.path = Path(path)
        self.threads = max(1, threads)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None
        self._fd: int | None = None
        if not hasattr(os, "pread"):
            raise ReaderUnavailableError(f"{self.path}: the tifffile reader needs os.pread (not on this platform)")
        try:
            self._tiff = tifffile.TiffFile(self.path)
        except (tifffile.TiffFileError, OSError, ValueError) as error:
            raise ReaderUnavailableError(f"{self.path}: tifffile cannot parse it ({error})") from error
        try:
            tiled = [page for page in self._tiff.pages if getattr(page, "is_tiled", False)]
            self._levels = [self._level(tiled, size) for size in levels]
            self._fd = os.open(self.path, os.O_RDONLY)
        except BaseException:
            self._tiff.close()
            raise

    def _level(self, pages: list, size: tuple[int, int]) -> tuple:
        width, height = size
        for page in pages:
            if (page.imagewidth, page.imagelength) != (width, height):
                continue
            why = _unsupported(page)
            if why:
                raise ReaderUnavailableError(f"{self.path}: the {width} x {height} level is {why}")
            return (page, page.tilewidth, page.tilelength, -(-width // page.tilewidth), page.dataoffsets,
                    page.databytecounts, page.decode, page.jpegtables)
        raise ReaderUnavailableError(f"{self.path}: no tiled TIFF page holds the {width} x {height} level")

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB [height, width, 3] of `level` from level pixel (x, y); white where the region leaves the image.

        A region over several tiles decodes them on a small thread pool (libjpeg-turbo releases the GIL), as
        OpenSlide's peers do; one tile (vlm's aligned grid reads) is decoded in the calling thread.
        """
        page, tile_w, tile_h, cols, offsets, counts, decode, tables = self._levels[level]
        image_w, image_h = page.imagewidth, page.imagelength
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, image_w), min(y + height, image_h)
        if x1 <= x0 or y1 <= y0:
            return out
        tiles = [(row, col) for row in range(y0 // tile_h, (y1 - 1) // tile_h + 1)
                 for col in range(x0 // tile_w, (x1 - 1) // tile_w + 1)
                 if counts[row * cols + col]]  # a sparse tile: OpenSlide leaves it transparent, i.e. white here

        def paste(tile_at: tuple[int, int]) -> None:
            row, col = tile_at
            index = row * cols + col
            data = os.pread(self._fd, counts[index], offsets[index])
            try:
                tile, _, _ = decode(data, index, jpegtables=tables)
            except Exception as error:  # imagecodecs raises its own error types per codec
                raise OSError(f"tile {index} of the {image_w} x {image_h} level: {error}") from error
            tile = tile.reshape(tile.shape[-3:])
            left, top = col * tile_w, row * tile_h
            ty0, ty1 = max(y0, top), min(y1, top + tile_h)
            tx0, tx1 = max(x0, left), min(x1, left + tile_w)
            out[ty0 - y : ty1 - y, tx0 - x : tx1 - x] = tile[ty0 - top : ty1 - top, tx0 - left : tx1 - left, :3]

        if len(tiles) > 1 and self.threads > 1:
            list(self._executor().map(paste, tiles))  # disjoint parts of `out`; re-raises a tile's error
        else:
            for tile_at in tiles:
                paste(tile_at)
        return out

    def _executor(self) -> ThreadPoolExecutor:
        """This process's decode pool: a pool inherited through fork has no threads and would wait forever."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool, self._pool_pid = ThreadPoolExecutor(self.threads, thread_name_prefix="vlm-tiff"), os.getpid()
        return self._pool

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown()
        self._pool = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tiff.close()


def _unsupported(page: object) -> str:
    """Why tifffile's decoding of this page could differ from OpenSlide's ('' when it reads it alike)."""
    if int(page.compression) not in _COMPRESSIONS:
        return f"compressed with TIFF compression {int(page.compression)}"
    if int(page.photometric) not in _PHOTOMETRICS or page.samplesperpixel != 3:
        return f"not RGB (photometric {int(page.photometric)}, {page.samplesperpixel} samples per pixel)"
    if page.bitspersample != 8 or int(page.planarconfig) != 1 or page.tiledepth != 1:
        return "not 8-bit interleaved 2-D tiles"
    return ""


def resolve_reader(reader: str, path: Path, properties: Mapping[str, str], levels: tuple) -> TiffTileReader | None:
    """The fast reader for this slide, or None for OpenSlide.

    `auto` picks tifffile for OpenSlide's `generic-tiff` and `aperio` slides whose levels it can read, and
    OpenSlide for everything else (logged at debug level); `tifffile` raises ReaderUnavailableError where
    it cannot read the slide; `openslide` is OpenSlide alone.
    """
    check_reader(reader)
    if reader == "openslide":
        return None
    vendor = properties.get("openslide.vendor", "")
    try:
        if vendor not in TIFF_VENDORS:
            raise ReaderUnavailableError(
                f"{path}: the tifffile reader reads {' and '.join(TIFF_VENDORS)} slides; OpenSlide says this "
                f"is {vendor or 'an unnamed format'}"
            )
        return TiffTileReader(path, levels)
    except ReaderUnavailableError as error:
        if reader == "tifffile":
            raise ReaderUnavailableError(f"{error}; read it with `reader` openslide (or auto)") from None
        log.debug("%s: reading with OpenSlide (%s)", path, error)
        return None

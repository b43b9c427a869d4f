"""Write pyramidal TIFF slides that OpenSlide reads, for tests, benchmarks and the offline demo.

Real slides cannot be shipped in bulk, yet every stage must be exercised through real OpenSlide reads.
A "generic tiled TIFF" with each pyramid level a separate top-level IFD (reduced levels marked
`subfiletype=1`) and resolution tags in centimetres is what OpenSlide opens with a known mpp.
Pixels come from a region function so that slides far larger than memory can be written tile by tile.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import tifffile

# region(downsample, y0, x0, height, width) -> uint8 [height, width, 3] at that downsample of level 0
RegionFn = Callable[[int, int, int, int, int], np.ndarray]


def array_region(image: np.ndarray) -> RegionFn:
    """A region function over an in-memory level-0 RGB array (levels by block averaging)."""

    def region(downsample: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        block = image[y0 * downsample : (y0 + height) * downsample, x0 * downsample : (x0 + width) * downsample]
        if downsample > 1:
            h, w = block.shape[0] // downsample, block.shape[1] // downsample
            block = block[: h * downsample, : w * downsample]
            block = block.reshape(h, downsample, w, downsample, 3).mean(axis=(1, 3)).astype(np.uint8)
        out = np.full((height, width, 3), 255, np.uint8)
        out[: block.shape[0], : block.shape[1]] = block
        return out

    return region


def _tiles(region: RegionFn, downsample: int, height: int, width: int, tile: int) -> Iterator[np.ndarray]:
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            yield np.ascontiguousarray(region(downsample, y0, x0, tile, tile))


def write_pyramidal_tiff(
    path: str | os.PathLike[str],
    size: tuple[int, int],
    region: RegionFn | np.ndarray,
    mpp: float | None,
    n_levels: int = 3,
    tile: int = 256,
    compression: str | None = "jpeg",
) -> None:
    """Write a `size` = (width, height) level-0 slide with `n_levels` levels, each half the last.

    `mpp=None` writes no resolution tags, producing a slide whose µm/px is unknown (for error paths).
    """
    if isinstance(region, np.ndarray):
        region = array_region(region)
    width, height = size
    resolution_kwargs = {}
    if mpp is not None:
        pixels_per_cm = 1e4 / mpp
        resolution_kwargs = {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31 // 3) as tif:
        for level in range(n_levels):
            downsample = 2**level
            level_w, level_h = max(1, width // downsample), max(1, height // downsample)
            level_mpp_kwargs = dict(resolution_kwargs)
            if mpp is not None:
                ppcm = 1e4 / (mpp * downsample)
                level_mpp_kwargs["resolution"] = (ppcm, ppcm)
            tif.write(
                _tiles(region, downsample, level_h, level_w, tile),
                shape=(level_h, level_w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                subfiletype=0 if level == 0 else 1,
                metadata=None,
                **level_mpp_kwargs,
            )

"""The tile grid: which tiles of a slide hold tissue, at a target mpp and tile size.

Tiles are `tile_size` pixels at `target_mpp` (default 256 px at 0.5 µm/px, as Prov-GigaPath), i.e.
`tile_size_level0 = round(tile_size * target_mpp / mpp)` level-0 pixels: a 0.25-mpp slide gives 512-px
level-0 tiles that are read and resized to 256. The grid is non-overlapping and starts at (0, 0); tiles
that would overhang the slide's right or bottom edge are dropped. A tile is kept when the tissue mask
covers at least `min_tissue` of it. Coordinates are level-0 (x, y) of each tile's top-left corner.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

from vlm.errors import InputError, UsageError
from vlm.formats.features import TileGrid
from vlm.io import atomic_path
from vlm.wsi.slide import Slide
from vlm.wsi.tissue import TissueMask, TissueParams, detect_tissue, read_downsampled

# Mask pixels along one tile side: the per-tile tissue fraction is then exact to 1/256.
MASK_PX_PER_TILE = 16


class NoTissueError(InputError):
    """No tile of the slide holds enough tissue."""


@dataclass(frozen=True)
class TilingParams:
    target_mpp: float = 0.5
    tile_size: int = 256
    min_tissue: float = 0.1  # fraction of the tile covered by tissue (Prov-GigaPath: > 0.1)
    tissue: TissueParams = field(default_factory=TissueParams)

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise UsageError(f"`target_mpp` must be positive, got {self.target_mpp}")
        if self.tile_size < 8:
            raise UsageError(f"`tile_size` must be at least 8 px, got {self.tile_size}")
        if not 0 <= self.min_tissue <= 1:
            raise UsageError(f"`min_tissue` is a fraction in [0, 1], got {self.min_tissue}")


@dataclass(frozen=True)
class ReadPlan:
    """How to read one tile: from which level, how many pixels there, and the output size."""

    level: int
    read_size: int  # pixels at `level` covering one tile
    tile_size: int  # output pixels after resizing

    @property
    def needs_resize(self) -> bool:
        return self.read_size != self.tile_size


# A tile may be read from up to this much fewer level-0 pixels than it has (a 20× scan at 0.504 µm/px gives
# 254-px tiles for 256 px at 0.5 µm/px); anything coarser would be upsampled, which `vlm tile` never does.
MAX_UPSAMPLE = 1.05


def tile_size_level0(mpp: float, params: TilingParams, where: str = "slide") -> int:
    """Level-0 pixels per tile; a slide coarser than the target (its tiles would be upsampled) is refused."""
    exact = params.tile_size * params.target_mpp / mpp
    size0 = round(exact)
    if size0 * MAX_UPSAMPLE < params.tile_size:
        raise UsageError(
            f"{where}: at {mpp:g} µm/px a {params.tile_size}-px tile at {params.target_mpp} µm/px spans only "
            f"{exact:.3g} level-0 px and would be upsampled; tile it at its own scale (`target_mpp` {mpp:g} or "
            "coarser), or check its µm/px (`mpp`)"
        )
    return size0


def read_plan(slide: Slide, tile_size_at_level0: int, tile_size: int) -> ReadPlan:
    """Read from the coarsest level that is not coarser than the target (never upsample)."""
    level = slide.best_level_for_downsample(tile_size_at_level0 / tile_size)
    read_size = max(1, round(tile_size_at_level0 / slide.level_downsamples[level]))
    return ReadPlan(level=level, read_size=read_size, tile_size=tile_size)


def tissue_fraction_per_tile(mask: np.ndarray) -> np.ndarray:
    """Mean of the mask over each MASK_PX_PER_TILE block: [rows, cols] fractions for whole tiles."""
    rows, cols = mask.shape[0] // MASK_PX_PER_TILE, mask.shape[1] // MASK_PX_PER_TILE
    blocks = mask[: rows * MASK_PX_PER_TILE, : cols * MASK_PX_PER_TILE]
    return blocks.reshape(rows, MASK_PX_PER_TILE, cols, MASK_PX_PER_TILE).mean(axis=(1, 3))


@dataclass
class TilingResult:
    grid: TileGrid
    tissue: TissueMask


def tile_slide(slide: Slide, params: TilingParams = TilingParams()) -> TilingResult:
    """Detect tissue and lay the tile grid on one slide; raises NoTissueError when nothing qualifies."""
    size0 = tile_size_level0(slide.mpp, params, str(slide.path))
    tissue = detect_tissue(slide, downsample=size0 / MASK_PX_PER_TILE, params=params.tissue)
    width, height = slide.dimensions
    fractions = tissue_fraction_per_tile(tissue.mask)
    # Only whole tiles inside the slide.
    fractions = fractions[: height // size0, : width // size0]
    rows, cols = np.nonzero(fractions >= max(params.min_tissue, 1e-9))
    if len(rows) == 0:
        raise NoTissueError(
            f"{slide.path}: no tissue found (tissue covers {tissue.fraction:.1%} of the slide; no "
            f"{params.tile_size}-px tile at {params.target_mpp} mpp has >= {params.min_tissue:.0%} tissue)"
        )
    order = np.lexsort((cols, rows))  # row-major: y first, then x
    coords = np.stack([cols[order] * size0, rows[order] * size0], axis=1).astype(np.int64)
    grid = TileGrid(
        coords=coords,
        mpp=slide.mpp,
        tile_size=params.tile_size,
        target_mpp=params.target_mpp,
        tile_size_level0=size0,
        slide_path=str(slide.path),
    )
    return TilingResult(grid=grid, tissue=tissue)


def write_qc_thumbnail(
    path: str | os.PathLike[str], slide: Slide, result: TilingResult, max_side: int = 1024
) -> None:
    """Save a thumbnail with the tissue outline (green) and the kept tiles (blue boxes) drawn on it."""
    width, height = slide.dimensions
    downsample = max(width, height) / max_side
    level = slide.best_level_for_downsample(downsample)
    size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    image = Image.fromarray(read_downsampled(slide, level, size))  # in strips where the level is large
    mask = Image.fromarray(result.tissue.mask).resize(size, Image.Resampling.NEAREST)
    outline = find_boundaries(np.asarray(mask), mode="inner")
    rgb = np.asarray(image).copy()
    rgb[outline] = (0, 200, 0)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    tile = result.grid.tile_size_level0 / downsample
    for x, y in result.grid.coords / downsample:
        draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline=(0, 60, 255))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")

"""Find tissue on a low-resolution view of the slide.

Method (documented in docs/slides.md): read the pyramid level closest to (and not coarser than) the mask
resolution, resize it to the mask grid, convert to HSV and threshold the saturation channel with Otsu's
method — H&E-stained tissue is coloured, glass and background are grey or white. The threshold is never
below `min_saturation`, so an empty (all-white) slide yields no tissue rather than thresholded noise.
Then connected components smaller than `min_object_px` are removed (dust, debris) and holes smaller than
`max_hole_px` are filled (lumens, fat vacuoles inside tissue are kept as tissue).

Memory stays bounded on slides without a pyramid: a level of more than `STRIP_PIXELS` pixels (a one-level
TIFF's level 0, 12,288² px and up) is read in horizontal strips of at most that many pixels, each resized
on the fly to its rows of the mask grid (`read_downsampled`); a pyramid's small levels are read in one go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from vlm.wsi.slide import Slide

# The most level pixels one read holds: 4 Mpx are 16 MB as OpenSlide's RGBA buffer, as much again as PIL's
# image of it and 12 MB as RGB. Levels up to this size (a pyramid's thumbnail levels) are read whole, larger
# ones (no pyramid) in strips of this size.
STRIP_PIXELS = 4 * 2**20


@dataclass(frozen=True)
class TissueParams:
    """Knobs of the tissue detector; areas in mask pixels (one tile spans `mask_px_per_tile`² of them)."""

    min_saturation: int = 20  # 0..255; floor under Otsu's threshold
    min_object_px: int = 64  # a quarter of a tile at the default 16 mask px per tile side
    max_hole_px: int = 1024  # four tiles


@dataclass
class TissueMask:
    """A boolean tissue mask over the slide; pixel (r, c) covers level-0 [c*d, (c+1)*d) × [r*d, (r+1)*d)."""

    mask: np.ndarray  # [H_mask, W_mask] bool
    downsample: float  # level-0 pixels per mask pixel
    threshold: float  # saturation threshold that was applied (0..255)
    thumbnail: np.ndarray  # [H_mask, W_mask, 3] uint8, the RGB the mask was computed from

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in 0..255 (as PIL computes it)."""
    return np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1]


def tissue_mask_from_rgb(rgb: np.ndarray, params: TissueParams = TissueParams()) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of an RGB image and the saturation threshold used."""
    sat = saturation(rgb)
    otsu = float(threshold_otsu(sat)) if sat.min() != sat.max() else 255.0
    threshold = max(otsu, float(params.min_saturation))
    mask = sat > threshold
    mask = remove_small_objects(mask, max_size=params.min_object_px)
    mask = remove_small_holes(mask, max_size=params.max_hole_px)
    return mask, threshold


def detect_tissue(slide: Slide, downsample: float, params: TissueParams = TissueParams()) -> TissueMask:
    """Tissue mask at `downsample` level-0 pixels per mask pixel, from the best low-resolution level."""
    width, height = slide.dimensions
    mask_size = (max(1, int(np.ceil(width / downsample))), max(1, int(np.ceil(height / downsample))))
    level = slide.best_level_for_downsample(downsample)
    # The level covers the full slide; map it onto the exact mask grid (the grid may overhang the
    # slide by less than one mask pixel, which resizing absorbs).
    rgb = read_downsampled(slide, level, mask_size)
    mask, threshold = tissue_mask_from_rgb(rgb, params)
    return TissueMask(mask=mask, downsample=downsample, threshold=threshold, thumbnail=rgb)


def read_downsampled(slide: Slide, level: int, size: tuple[int, int], max_pixels: int | None = None) -> np.ndarray:
    """The whole of `level` resized (bilinear) to `size` = (width, height): [height, width, 3] uint8.

    A level of at most `max_pixels` is read in one go. A larger one is read in horizontal strips, each with
    the few rows of margin that the filter reaches, and PIL resizes each strip's box of the level onto its
    output rows: the pixels of resizing the level whole (exactly where `size` divides the level, within 1/255
    on a few pixels otherwise; `tests/test_tiling.py` checks it) while holding about `max_pixels` at a time.
    """
    max_pixels = STRIP_PIXELS if max_pixels is None else max_pixels
    level_w, level_h = slide.level_dimensions[level]
    out_w, out_h = size
    if level_w * level_h <= max_pixels:
        return np.asarray(Image.fromarray(slide.read_level_rgb(level)).resize(size, Image.Resampling.BILINEAR))
    scale = level_h / out_h  # level rows per output row
    margin = math.ceil(scale) + 2  # the bilinear filter reaches `scale` rows either side of a row's centre
    rows_per_strip = max(1, int((max_pixels // level_w - 2 * margin) / scale))
    level_downsample = slide.level_downsamples[level]
    out = np.empty((out_h, out_w, 3), np.uint8)
    for r0 in range(0, out_h, rows_per_strip):
        r1 = min(out_h, r0 + rows_per_strip)
        top = max(0, math.floor(r0 * scale) - margin)
        bottom = min(level_h, math.ceil(r1 * scale) + margin)
        strip = slide.read_region_rgb((0, round(top * level_downsample)), level, (level_w, bottom - top))
        box = (0.0, r0 * scale - top, float(level_w), r1 * scale - top)
        out[r0:r1] = np.asarray(strip.resize((out_w, r1 - r0), Image.Resampling.BILINEAR, box=box))
    return out

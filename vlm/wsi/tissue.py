"""Find tissue on a low-resolution view of the slide.

Method (documented in docs/slides.md): read the pyramid level closest to (and not coarser than) the mask
resolution, resize it to the mask grid, convert to HSV and threshold the saturation channel with Otsu's
method — H&E-stained tissue is coloured, glass and background are grey or white. The threshold is never
below `min_saturation`, so an empty (all-white) slide yields no tissue rather than thresholded noise.
Then connected components smaller than `min_object_px` are removed (dust, debris) and holes smaller than
`max_hole_px` are filled (lumens, fat vacuoles inside tissue are kept as tissue).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from vlm.wsi.slide import Slide


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
    image = Image.fromarray(slide.read_level_rgb(level))
    # The level covers the full slide; map it onto the exact mask grid (the grid may overhang the
    # slide by less than one mask pixel, which resizing absorbs).
    rgb = np.asarray(image.resize(mask_size, Image.Resampling.BILINEAR))
    mask, threshold = tissue_mask_from_rgb(rgb, params)
    return TissueMask(mask=mask, downsample=downsample, threshold=threshold, thumbnail=rgb)

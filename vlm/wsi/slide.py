"""Open a whole-slide image with OpenSlide and establish its physical scale (µm per level-0 pixel).

Pixels come from the reader `reader` names (`vlm.wsi.readers`: tifffile for pyramidal TIFF and SVS under
`auto`, OpenSlide for everything else); the levels, properties and µm/px always come from OpenSlide.

Every later stage works in physical units (tiles at 0.5 µm/px, GigaPath positions in 0.5-µm pixels), so
a slide without a trustworthy mpp (none, or one outside `vlm.formats.features.PLAUSIBLE_MPP`) is refused here,
with the fix (`--mpp`) in the message, rather than surfacing as a wrong scale or a `NoneType` error deep
inside a later stage.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from vlm.errors import InputError, UsageError
from vlm.formats.features import check_plausible_mpp
from vlm.wsi.readers import TiffTileReader, check_reader, resolve_reader

# µm per unit of the TIFF ResolutionUnit tag, for slides where OpenSlide reports no openslide.mpp-x
_TIFF_UNIT_UM = {"centimeter": 1e4, "inch": 25_400.0}


class SlideReadError(InputError):
    """The file is missing, not a slide, or unreadable by OpenSlide."""


class MissingMppError(InputError):
    """The slide records no µm/px, and none was given."""


class ImplausibleMppError(InputError):
    """The slide records a µm/px no brightfield scan has (a placeholder), and none was given."""


@dataclass(frozen=True)
class SlideInfo:
    """What a user needs to know about a slide before tiling it."""

    path: str
    vendor: str
    dimensions: tuple[int, int]  # level-0 (width, height)
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float  # level-0 µm per pixel
    mpp_source: str  # "openslide", "tiff-resolution" or "user"
    objective_power: float | None
    reader: str = "openslide"  # the pixel reader that serves read_region_array: "tifffile" or "openslide"


def _mpp_from_properties(properties: openslide._PropertyMap | dict[str, str]) -> tuple[float, str] | None:
    try:
        mpp_x = float(properties[openslide.PROPERTY_NAME_MPP_X])
        mpp_y = float(properties.get(openslide.PROPERTY_NAME_MPP_Y, mpp_x))
        if mpp_x > 0 and mpp_y > 0:
            return (mpp_x + mpp_y) / 2, "openslide"
    except (KeyError, ValueError):
        pass
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    try:
        x_resolution = float(properties["tiff.XResolution"])
    except (KeyError, ValueError):
        return None
    if unit in _TIFF_UNIT_UM and x_resolution > 1:
        return _TIFF_UNIT_UM[unit] / x_resolution, "tiff-resolution"
    return None


class Slide:
    """An open slide: OpenSlide handle + resolved mpp + pixel reader. Use as a context manager to close it.

    `reader` ("auto", "openslide", "tifffile") picks the pixel reader (`vlm.wsi.readers.resolve_reader`).
    """

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None, reader: str = "auto") -> None:
        self.path = Path(path)
        check_reader(reader)
        self._fast: TiffTileReader | None = None
        if not self.path.is_file():
            raise SlideReadError(f"{self.path}: no such slide file")
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as error:
            raise SlideReadError(
                f"{self.path}: not a slide OpenSlide can read ({type(error).__name__}: {error})"
            ) from error
        if mpp is not None:
            if not (math.isfinite(mpp) and mpp > 0):
                raise UsageError(f"`mpp` must be a positive number of µm per pixel, got {mpp}")
            self.mpp, self.mpp_source = float(mpp), "user"
        else:
            found = _mpp_from_properties(self._slide.properties)
            if found is None:
                self._slide.close()
                raise MissingMppError(
                    f"{self.path}: the slide records no microns-per-pixel (no openslide.mpp-x, no TIFF "
                    "resolution); pass it with `mpp` (e.g. `mpp` 0.25 for 40x, 0.5 for 20x scans)"
                )
            self.mpp, self.mpp_source = found
            try:
                check_plausible_mpp(self.mpp, str(self.path), f"{self.mpp_source} metadata")
            except ValueError as error:
                self._slide.close()
                raise ImplausibleMppError(str(error)) from None
        try:
            self._fast = resolve_reader(reader, self.path, self._slide.properties, self._slide.level_dimensions)
        except ValueError:
            self._slide.close()
            raise

    @property
    def reader(self) -> str:
        """The pixel reader in use: 'tifffile' or 'openslide'."""
        return "openslide" if self._fast is None else "tifffile"

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._slide.dimensions

    @property
    def level_count(self) -> int:
        return self._slide.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._slide.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._slide.level_downsamples

    def info(self) -> SlideInfo:
        power = self._slide.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        return SlideInfo(
            path=str(self.path),
            vendor=str(self._slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")),
            dimensions=self.dimensions,
            level_dimensions=tuple(self.level_dimensions),
            level_downsamples=tuple(self.level_downsamples),
            mpp=self.mpp,
            mpp_source=self.mpp_source,
            objective_power=float(power) if power else None,
            reader=self.reader,
        )

    def best_level_for_downsample(self, downsample: float) -> int:
        """The lowest-resolution level that is still at least as sharp as `downsample` (no upsampling).

        A 1 % tolerance absorbs pyramids whose reported downsamples are 2.0004 rather than 2.
        """
        best = 0
        for level, level_downsample in enumerate(self.level_downsamples):
            if level_downsample <= downsample * 1.01:
                best = level
        return best

    def read_region_array(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 [H, W, 3] of `size` at `level` from the level-0 `location`, as OpenSlide's `read_region`
        places it; transparent pixels (outside scanned areas, outside the slide) become white background."""
        x, y = location
        if self._fast is not None:
            downsample = self._slide.level_downsamples[level]
            level_x, level_y = x / downsample, y / downsample
            if level_x.is_integer() and level_y.is_integer():  # else OpenSlide's subpixel placement
                try:
                    return self._fast.read(level, int(level_x), int(level_y), size[0], size[1])
                except OSError as error:
                    raise SlideReadError(
                        f"{self.path}: failed to read region {location} at level {level}: {error}"
                    ) from error
        try:
            rgba = np.asarray(self._slide.read_region(location, level, size))
        except openslide.OpenSlideError as error:
            raise SlideReadError(f"{self.path}: failed to read region {location} at level {level}: {error}") from error
        return rgba_to_rgb(rgba)

    def read_region_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """`read_region_array` as a PIL image (for PIL transforms and resizing)."""
        return Image.fromarray(self.read_region_array(location, level, size))

    def read_level_rgb(self, level: int) -> np.ndarray:
        """A whole pyramid level as an RGB array [H, W, 3] (callers pick a small level)."""
        return self.read_region_array((0, 0), level, self.level_dimensions[level])

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        self._slide.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's RGBA [H, W, 4] (straight alpha) over a white background, as RGB [H, W, 3].

    The arithmetic of PIL's `Image.paste(rgba, mask=alpha)` onto white, which vlm used before (same bytes for
    every colour and alpha): round((c * a + 255 * (255 - a)) / 255) with PIL's DIV255 rounding.
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:]
    if alpha.min() == 255:  # fully scanned region: the common, fast case
        return np.ascontiguousarray(rgb)
    blended = rgb.astype(np.uint32) * alpha + 255 * (255 - alpha.astype(np.uint32)) + 128
    return (((blended >> 8) + blended) >> 8).astype(np.uint8)


def open_slide(path: str | os.PathLike[str], mpp: float | None = None, reader: str = "auto") -> Slide:
    """Open `path` with OpenSlide; `mpp` overrides or supplies the level-0 µm/px; `reader` picks the pixel
    reader ("auto": tifffile for pyramidal TIFF and SVS, else OpenSlide)."""
    return Slide(path, mpp=mpp, reader=reader)

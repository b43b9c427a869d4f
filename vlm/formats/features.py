"""Tile grids and tile features on disk: one `<slide_id>.h5` per slide, with provenance.

Layout (vlm's own; TRIDENT's and CLAM's files are read too, see `read_tile_grid`):
- dataset `coords`   [N, 2] int64, level-0 pixel (x, y) of each tile's top-left corner;
- dataset `features` [N, D] float32 (or float16), absent in a tile-grid file written by `vlm tile`;
- attributes `mpp` (level-0 µm/px), `tile_size` (px at `target_mpp`), `tile_size_level0`, `target_mpp`,
  `encoder` (tile encoder name, feature files only), `vlm_version`, `slide_path`.

Coordinates stay in level-0 pixels; consumers that need another unit (the GigaPath slide encoder wants
0.5-mpp pixels) convert with `mpp`, which is why a reader refuses a file it cannot find an mpp for.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vlm import __version__
from vlm.errors import InputError, MissingInputError
from vlm.io import atomic_path

log = logging.getLogger(__name__)


class FeatureFileError(InputError):
    """A tile-grid or feature file is missing, unreadable, or inconsistent."""


@dataclass
class TileGrid:
    """Where the tiles of one slide are, in level-0 pixels, and at what scale they were cut."""

    coords: np.ndarray  # [N, 2] int64 level-0 (x, y)
    mpp: float  # level-0 µm per pixel
    tile_size: int  # pixels at target_mpp
    target_mpp: float
    tile_size_level0: int  # pixels at level 0 covered by one tile
    slide_path: str = ""
    mpp_source: str = "given"  # where `mpp` came from (provenance; not written to files)

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.coords)


@dataclass
class TileFeatures:
    """A tile grid plus one feature vector per tile."""

    grid: TileGrid
    features: np.ndarray  # [N, D]
    encoder: str = "unknown"
    extra_attrs: dict[str, object] = field(default_factory=dict)

    @property
    def coords(self) -> np.ndarray:
        return self.grid.coords

    @property
    def mpp(self) -> float:
        return self.grid.mpp


def _grid_attrs(grid: TileGrid) -> dict[str, object]:
    return {
        "mpp": float(grid.mpp),
        "tile_size": int(grid.tile_size),
        "target_mpp": float(grid.target_mpp),
        "tile_size_level0": int(grid.tile_size_level0),
        "slide_path": str(grid.slide_path),
        "vlm_version": __version__,
    }


def write_tile_grid(path: str | os.PathLike[str], grid: TileGrid) -> None:
    """Write a coords-only file (the output of `vlm tile`), atomically."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("coords", data=grid.coords, fletcher32=True)
        h5.attrs.update(_grid_attrs(grid))


def write_features(path: str | os.PathLike[str], tile_features: TileFeatures, dtype: str = "float32") -> None:
    """Write features + coords + provenance attributes, atomically."""
    features = np.asarray(tile_features.features)
    if features.ndim != 2 or len(features) != len(tile_features.grid):
        raise FeatureFileError(
            f"{path}: features have shape {features.shape}, expected [{len(tile_features.grid)}, D]"
        )
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        # Fletcher-32 checksums: a flipped byte is refused on read instead of read as another number.
        h5.create_dataset("coords", data=tile_features.grid.coords, fletcher32=True)
        h5.create_dataset("features", data=features.astype(dtype), fletcher32=True)
        h5.attrs.update(_grid_attrs(tile_features.grid))
        h5.attrs["encoder"] = tile_features.encoder


# Level-0 µm/px a slide or feature file may record without --mpp. 0.08 is below any brightfield scan
# (100× oil objectives give ~0.1); 2.4 is where TRIDENT stops (its coarsest bin, 5×, is < 2.4 µm/px).
# Outside this range the value is a placeholder (openslide-python's boxes.tiff records 352 µm/px).
PLAUSIBLE_MPP = (0.08, 2.4)
MPP_FROM_FILE = "the file's 'mpp' attribute"  # TileGrid.mpp_source of a file that records its own scale
# A --mpp more than this far from the magnification a TRIDENT file records contradicts it.
MAGNIFICATION_TOLERANCE = 0.25


def check_plausible_mpp(mpp: float, where: str, source: str) -> float:
    """`mpp` if it is a plausible level-0 µm/px, else a ValueError naming `where`, the source and the fix."""
    low, high = PLAUSIBLE_MPP
    if not (math.isfinite(mpp) and low <= mpp < high):
        raise InputError(
            f"{where}: level-0 scale {mpp:g} µm/px (from {source}) is outside the plausible range "
            f"[{low}, {high}) µm/px of brightfield scans; if it is really right, or to supply the true "
            "value, pass `mpp`"
        )
    return mpp


def _attr(h5: h5py.File, name: str) -> object | None:
    """An attribute from the file or from its `coords` dataset (where CLAM/TRIDENT keep patch info)."""
    for holder in (h5.attrs, h5["coords"].attrs):
        if name in holder:
            value = holder[name]
            return value.item() if isinstance(value, np.generic) else value
    return None


def _number(path: Path, name: str, value: object, integer: bool = False) -> float | None:
    """A positive finite number from an attribute, or an error naming the file and the attribute."""
    if value is None:
        return None
    if isinstance(value, bytes | str | np.ndarray) or not isinstance(value, int | float):
        raise FeatureFileError(
            f"{path}: attribute {name!r} is {value!r} ({type(value).__name__}), expected a positive number; "
            "rewrite the attribute as a number"
        )
    number = float(value)
    if not math.isfinite(number) or number <= 0 or (integer and number != round(number)):
        kind = "a positive integer" if integer else "a positive number"
        raise FeatureFileError(f"{path}: attribute {name!r} is {value!r}, expected {kind}")
    return number


def _read_coords(path: Path, read: Callable[[h5py.File], Any], hint: str = "") -> tuple[np.ndarray, Any]:
    """`coords` of an h5 file and `read(file)`, with one error naming the file when either is missing."""
    try:
        with h5py.File(path, "r") as h5:
            if "coords" not in h5:
                raise FeatureFileError(f"{path}: no 'coords' dataset (datasets present: {sorted(h5.keys())}){hint}")
            return np.asarray(h5["coords"][:]), read(h5)
    except OSError as error:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({error})") from error


_GRID_ATTRIBUTES = ("mpp", "tile_size_level0", "patch_size_level0", "tile_size", "patch_size", "target_mpp",
                    "level0_magnification", "target_magnification")


def _grid_attributes(h5: h5py.File) -> tuple[dict[str, object | None], str]:
    return {name: _attr(h5, name) for name in _GRID_ATTRIBUTES}, _attr(h5, "slide_path") or ""


def _clam_geometry(path: Path, patches: Path, coords: np.ndarray) -> tuple[int, int]:
    """(tile_size, tile_size_level0) of a CLAM slide from its `patches/<slide>.h5`.

    CLAM's `create_patches_fp.py` stores `patch_size` (px at `patch_level`) and `downsample` (that level's
    downsample) on `coords`; a patch spans `patch_size * int(downsample)` level-0 pixels
    (wsi_core/WholeSlideImage.py, `process_contour`). Its feature files repeat the coords, in order.
    """
    geometry = patches / f"{path.stem}.h5" if patches.is_dir() else patches
    if not geometry.is_file():
        raise FeatureFileError(f"{path}: no CLAM patch file {geometry} (from create_patches_fp.py) for this slide")
    hint = "; is it a CLAM patches/<slide>.h5 file?"
    patch_coords, attrs = _read_coords(geometry, lambda h5: dict(h5["coords"].attrs), hint)
    missing = [name for name in ("patch_size", "downsample") if name not in attrs]
    if missing:
        raise FeatureFileError(f"{geometry}: 'coords' lacks CLAM attribute(s) {missing}")
    patch_size = _number(geometry, "patch_size", np.asarray(attrs["patch_size"]).item(), integer=True)
    downsample = np.atleast_1d(np.asarray(attrs["downsample"], dtype=np.float64))
    if not np.isfinite(downsample).all() or (downsample <= 0).any() or len(set(downsample.tolist())) != 1:
        raise FeatureFileError(f"{geometry}: attribute 'downsample' is {downsample.tolist()}, expected (d, d) > 0")
    if patch_coords.shape != coords.shape or not np.array_equal(patch_coords, coords):
        raise FeatureFileError(
            f"{path}: its coords do not match the {len(patch_coords)} coords of {geometry}; "
            "the features were extracted from another patching run"
        )
    return int(patch_size), int(patch_size) * max(1, int(downsample[0]))


def read_tile_grid(
    path: str | os.PathLike[str], mpp: float | None = None, patches: str | os.PathLike[str] | None = None
) -> TileGrid:
    """Read the tile grid of a `vlm`, TRIDENT or CLAM h5 file, as each writer means its attributes.

    - vlm: attributes `mpp`, `tile_size`, `tile_size_level0`, `target_mpp`.
    - TRIDENT: no mpp; `level0_magnification`, `target_magnification`, `patch_size`, `patch_size_level0`
      on `coords`. Level-0 µm/px is `10 / level0_magnification`, TRIDENT's own definition
      (trident/wsi_objects/WSIPatcher.py); a `mpp` contradicting it by more than 25 % is refused.
    - CLAM (`extract_features_fp.py`): no attributes at all; the geometry is in the `patches/<slide>.h5`
      file of `create_patches_fp.py` (`patches`: that folder or file) and the scale must come from `mpp`.

    `mpp` overrides (or supplies) the level-0 µm/px. A recorded mpp outside `PLAUSIBLE_MPP` is refused
    unless `mpp` is given; so is a string or non-positive value in any geometry attribute.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: no such feature file")
    coords, (raw, slide_path) = _read_coords(path, _grid_attributes)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureFileError(f"{path}: 'coords' has shape {coords.shape}, expected [N, 2]")
    values = {name: _number(path, name, value) for name, value in raw.items()}
    if mpp is not None and not (math.isfinite(float(mpp)) and float(mpp) > 0):
        raise FeatureFileError(f"{path}: `mpp` must be a positive number of µm per level-0 pixel, got {mpp}")
    tile_size_level0 = values["tile_size_level0"] or values["patch_size_level0"]
    tile_size = values["tile_size"] or values["patch_size"]
    target_mpp = values["target_mpp"]
    magnification = values["level0_magnification"]
    if tile_size_level0 is None and patches is not None:
        tile_size, tile_size_level0 = _clam_geometry(path, Path(patches), coords)
    if tile_size_level0 is None:
        raise FeatureFileError(
            f"{path}: no tile size attribute (vlm's tile_size_level0 or TRIDENT's patch_size_level0); a CLAM "
            "feature file keeps its geometry in the patches/<slide>.h5 of create_patches_fp.py: pass "
            "`patches` DIR (and `mpp`)"
        )
    if mpp is not None:
        resolved, source = float(mpp), "--mpp"
        if magnification is not None:
            nominal = 10.0 / magnification
            if abs(resolved / nominal - 1) > MAGNIFICATION_TOLERANCE:
                raise FeatureFileError(
                    f"{path}: `mpp` {resolved:g} contradicts the file's level0_magnification "
                    f"{magnification:g}× ({nominal:g} µm/px, TRIDENT's 10 / magnification) by more than "
                    f"{MAGNIFICATION_TOLERANCE:.0%}; drop `mpp` for this cohort or fix the value"
                )
    elif values["mpp"] is not None:
        resolved, source = values["mpp"], MPP_FROM_FILE
    elif magnification is not None:
        resolved = 10.0 / magnification
        source = f"level0_magnification {magnification:g}× (10 / magnification, TRIDENT's definition)"
    else:
        raise FeatureFileError(f"{path}: no level-0 'mpp' attribute; pass the slide's µm/px with `mpp`")
    if mpp is None:
        try:
            check_plausible_mpp(resolved, str(path), source)
        except ValueError as error:
            raise FeatureFileError(str(error)) from None
    if tile_size is None:
        tile_size = tile_size_level0
    if target_mpp is None:
        magnification_target = values["target_magnification"]
        if magnification_target is not None and mpp is None:
            target_mpp = 10.0 / magnification_target
        else:
            target_mpp = resolved * tile_size_level0 / tile_size
    return TileGrid(
        coords=coords,
        mpp=resolved,
        tile_size=int(tile_size),
        target_mpp=float(target_mpp),
        tile_size_level0=int(round(tile_size_level0)),
        slide_path=str(slide_path),
        mpp_source=source,
    )


def feature_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """The shape of a file's `features` dataset, without reading it: the checks and orderings made before a
    run (feature width, tile count) read this, `read_features` the values."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            if not isinstance(h5.get("features"), h5py.Dataset):
                raise FeatureFileError(f"{path}: no 'features' dataset; run `vlm embed-tiles` on this tile grid first")
            return tuple(h5["features"].shape)
    except OSError as error:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({error})") from error


def read_features(
    path: str | os.PathLike[str], mpp: float | None = None, patches: str | os.PathLike[str] | None = None
) -> TileFeatures:
    """Read tile features (from `vlm embed-tiles`, TRIDENT or CLAM) with their grid (see `read_tile_grid`).

    `features` must be [N, D] with one row per `coords` row (CLAM's and TRIDENT's writers both write
    that); mismatched lengths are refused: silently pairing the wrong rows would corrupt every position.
    """
    path = Path(path)
    grid = read_tile_grid(path, mpp=mpp, patches=patches)
    try:
        with h5py.File(path, "r") as h5:
            if "features" not in h5:
                raise FeatureFileError(f"{path}: no 'features' dataset; run `vlm embed-tiles` on this tile grid first")
            features = np.asarray(h5["features"][:])
            encoder = _attr(h5, "encoder")
            if encoder is None and "encoder" in h5["features"].attrs:  # TRIDENT keeps it on `features`
                encoder = h5["features"].attrs["encoder"]
    except OSError as error:  # a damaged chunk (checksum mismatch, truncated data)
        raise FeatureFileError(f"{path}: 'features' is not readable ({error}); re-run `vlm embed-tiles`") from error
    if isinstance(encoder, bytes):
        encoder = encoder.decode("utf-8", "replace")
    if features.ndim != 2 or len(features) != len(grid):
        raise FeatureFileError(
            f"{path}: 'features' has shape {features.shape} but 'coords' has {len(grid)} rows"
        )
    return TileFeatures(grid=grid, features=features, encoder=str(encoder or "unknown"))


def feature_encoder(path: str | os.PathLike[str]) -> str | None:
    """The tile encoder a feature file records (vlm's root attribute `encoder`, TRIDENT's on `features`), read
    without the data; None when the file records none (CLAM) or cannot be read (its reader says why later)."""
    try:
        with h5py.File(path, "r") as h5:
            encoder = _attr(h5, "encoder")
            if encoder is None and isinstance(h5.get("features"), h5py.Dataset):
                encoder = h5["features"].attrs.get("encoder")
    except OSError:
        return None
    if isinstance(encoder, bytes):
        encoder = encoder.decode("utf-8", "replace")
    return None if encoder is None or str(encoder) in ("", "unknown") else str(encoder)


def is_written(path: str | os.PathLike[str], datasets: tuple[str, ...] = ("coords",)) -> bool:
    """Whether a resumed run may skip `path`: it opens as HDF5 and holds `datasets` (a copy cut short or a
    damaged file is redone, with a warning, instead of being counted done and failing a later stage)."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as h5:
            if all(name in h5 for name in datasets):
                return True
            problem = f"no {[name for name in datasets if name not in h5]} dataset"
    except OSError as error:
        problem = f"not a readable HDF5 file ({error})"
    log.warning("%s: %s; it is redone", path, problem)
    return False


def feature_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The `.h5` files of a folder, sorted; an empty or missing folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: not a folder of feature files")
    files = sorted(folder.glob("*.h5"))
    if not files:
        raise MissingInputError(f"{folder}: no .h5 feature files found")
    return files

"""Tile grids and tile features on disk: one `<slide_id>.h5` per slide, with provenance.

Layout (TRIDENT/CLAM convention, so files from those tools read too):
- dataset `coords`   [N, 2] int64, level-0 pixel (x, y) of each tile's top-left corner;
- dataset `features` [N, D] float32 (or float16), absent in a tile-grid file written by `vlm tile`;
- attributes `mpp` (level-0 µm/px), `tile_size` (px at `target_mpp`), `tile_size_level0`, `target_mpp`,
  `encoder` (tile encoder name, feature files only), `vlm_version`, `slide_path`.

Coordinates stay in level-0 pixels; consumers that need another unit (the GigaPath slide encoder wants
0.5-mpp pixels) convert with `mpp`, which is why a reader refuses a file it cannot find an mpp for.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from vlm import __version__
from vlm.io import atomic_path


class FeatureFileError(ValueError):
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
        h5.create_dataset("coords", data=grid.coords)
        h5.attrs.update(_grid_attrs(grid))


def write_features(path: str | os.PathLike[str], tile_features: TileFeatures, dtype: str = "float32") -> None:
    """Write features + coords + provenance attributes, atomically."""
    features = np.asarray(tile_features.features)
    if features.ndim != 2 or len(features) != len(tile_features.grid):
        raise FeatureFileError(
            f"{path}: features have shape {features.shape}, expected [{len(tile_features.grid)}, D]"
        )
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("coords", data=tile_features.grid.coords)
        h5.create_dataset("features", data=features.astype(dtype))
        h5.attrs.update(_grid_attrs(tile_features.grid))
        h5.attrs["encoder"] = tile_features.encoder


def _attr(h5: h5py.File, name: str) -> object | None:
    """An attribute from the file or from its `coords` dataset (where CLAM/TRIDENT keep patch info)."""
    for holder in (h5.attrs, h5["coords"].attrs):
        if name in holder:
            value = holder[name]
            return value.item() if isinstance(value, np.generic) else value
    return None


def read_tile_grid(path: str | os.PathLike[str], mpp: float | None = None) -> TileGrid:
    """Read the tile grid of a `vlm`, TRIDENT or CLAM h5 file.

    `mpp` overrides (or supplies) the level-0 µm/px; without it and without an `mpp` attribute the file
    cannot be placed on a physical scale, which is an error. TRIDENT/CLAM files keep the tile size in
    `patch_size_level0` / `patch_size` (on `coords`); both are understood.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: no such feature file")
    try:
        with h5py.File(path, "r") as h5:
            if "coords" not in h5:
                raise FeatureFileError(f"{path}: no 'coords' dataset (datasets present: {sorted(h5.keys())})")
            coords = np.asarray(h5["coords"][:])
            file_mpp = _attr(h5, "mpp")
            tile_size_level0 = _attr(h5, "tile_size_level0") or _attr(h5, "patch_size_level0")
            tile_size = _attr(h5, "tile_size") or _attr(h5, "patch_size") or tile_size_level0
            target_mpp = _attr(h5, "target_mpp")
            slide_path = _attr(h5, "slide_path") or ""
    except OSError as error:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({error})") from error
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureFileError(f"{path}: 'coords' has shape {coords.shape}, expected [N, 2]")
    resolved_mpp = mpp if mpp is not None else file_mpp
    if resolved_mpp is None or not math.isfinite(float(resolved_mpp)) or float(resolved_mpp) <= 0:
        raise FeatureFileError(f"{path}: no level-0 'mpp' attribute; pass the slide's µm/px with --mpp")
    resolved_mpp = float(resolved_mpp)
    if tile_size_level0 is None:
        raise FeatureFileError(f"{path}: no tile size attribute (tile_size_level0 or patch_size_level0)")
    if target_mpp is None:
        target_mpp = resolved_mpp * float(tile_size_level0) / float(tile_size)
    return TileGrid(
        coords=coords,
        mpp=resolved_mpp,
        tile_size=int(tile_size),
        target_mpp=float(target_mpp),
        tile_size_level0=int(tile_size_level0),
        slide_path=str(slide_path),
    )


def read_features(path: str | os.PathLike[str], mpp: float | None = None) -> TileFeatures:
    """Read tile features (from `vlm embed-tiles`, TRIDENT or CLAM) with their grid.

    CLAM stores `features` as [N, D] or [1, N, D]; both are accepted. Mismatched lengths of `features`
    and `coords` are refused: silently pairing the wrong rows would corrupt every downstream position.
    """
    path = Path(path)
    grid = read_tile_grid(path, mpp=mpp)
    with h5py.File(path, "r") as h5:
        if "features" not in h5:
            raise FeatureFileError(f"{path}: no 'features' dataset; run `vlm embed-tiles` on this tile grid first")
        features = np.asarray(h5["features"][:])
        encoder = str(_attr(h5, "encoder") or "unknown")
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2 or len(features) != len(grid):
        raise FeatureFileError(
            f"{path}: 'features' has shape {features.shape} but 'coords' has {len(grid)} rows"
        )
    return TileFeatures(grid=grid, features=features, encoder=encoder)


def feature_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The `.h5` files of a folder, sorted; an empty or missing folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of feature files")
    files = sorted(folder.glob("*.h5"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .h5 feature files found")
    return files

"""Fixed 2-D sin-cos positions of the GigaPath slide encoder, computed only for the tiles present.

The official code materialises the whole 1000×1000 (+1) × 768 table (3 GB fp32, 15.7 GB RAM to build).
Each row depends only on its own grid cell, so computing the rows for the cells a slide actually has gives
the same numbers: dims `[0, D/2)` encode the column `j = floor(y / tile)`, dims `[D/2, D)` the row
`i = floor(x / tile)`, each half `[sin(pos·ω_k), cos(pos·ω_k)]` with `ω_k = 1 / 10000^(k / (D/4))`, evaluated
in float64 with numpy (as the official MAE helper does) and cast to fp32.

Coordinates are pixels **at 0.5 µm/px** (the unit the weights were trained with), not level-0 pixels.
"""

from __future__ import annotations

import numpy as np
import torch

from vlm.errors import InputError, UsageError

GIGAPATH_MPP = 0.5  # µm/px of the coordinates the slide encoder expects


def _sincos_1d(positions: np.ndarray, dim: int) -> np.ndarray:
    """[len(positions), dim] float64 rows `[sin(p·ω), cos(p·ω)]`, exactly as the MAE helper computes them."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def grid_cells(coords: torch.Tensor, tile_size: int, grid_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row `i = floor(x / tile)` and column `j = floor(y / tile)` of each coordinate; out-of-grid is an error.

    The official code raises an index error for `x >= grid·tile` and silently wraps `y` into the next
    row; both are refused here instead.
    """
    cells = torch.floor(coords.double() / tile_size).long()  # [..., 2]
    bad = (cells < 0) | (cells >= grid_size)
    if bool(bad.any()):
        where = bad.any(-1).nonzero()[0].tolist()
        limit = grid_size * tile_size
        raise UsageError(
            f"tile coordinate {coords[tuple(where)].tolist()} (0.5-mpp px) is outside the "
            f"{grid_size}×{grid_size} grid of {tile_size}-px tiles (0 <= x, y < {limit}); coordinates "
            "must be 0.5-mpp pixels — build them with vlm.encoders.slide_inputs.load_slide_inputs"
        )
    return cells[..., 0], cells[..., 1]


def sincos_positions(coords: torch.Tensor, dim: int, tile_size: int = 256, grid_size: int = 1000) -> torch.Tensor:
    """Positional rows for `coords` [..., 2] (0.5-mpp px): [..., dim] fp32 on the coords' device."""
    if dim % 4:
        raise UsageError(f"embed_dim must be a multiple of 4 for 2-D sin-cos positions, got {dim}")
    i, j = grid_cells(coords, tile_size, grid_size)
    half = dim // 2
    # Only the distinct rows/columns are evaluated; a slide rarely spans more than a few hundred of each.
    i_values, i_index = torch.unique(i.cpu(), return_inverse=True)
    j_values, j_index = torch.unique(j.cpu(), return_inverse=True)
    i_rows = torch.from_numpy(_sincos_1d(i_values.numpy(), half)).float()
    j_rows = torch.from_numpy(_sincos_1d(j_values.numpy(), half)).float()
    rows = torch.cat([j_rows[j_index], i_rows[i_index]], dim=-1)
    return rows.to(coords.device)


# A tile whose physical size is within this factor of one position cell (256 px at 0.5 µm/px) takes one
# cell per grid step: this covers scanners' inexact scales (513 px at 0.2495 µm/px is 255.99 px) and
# TRIDENT's nominal magnifications (its 40× bin spans 0.2-0.3 µm/px).
ONE_CELL_PER_TILE = (0.8, 1.25)


def _check_scale(name: str, mpp: float, coords_level0: np.ndarray) -> np.ndarray:
    if not np.isfinite(mpp) or mpp <= 0:
        raise InputError(f"{name}mpp must be a positive number of µm per level-0 pixel, got {mpp!r}")
    coords = np.asarray(coords_level0, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise InputError(f"{name}coords must have shape [N, 2], got {coords.shape}")
    return coords


def _outside_error(name: str, outside: np.ndarray, coords: np.ndarray, mpp: float, grid_size: int, tile_size: int):
    first = int(np.flatnonzero(outside)[0])
    limit = grid_size * tile_size
    return ValueError(
        f"{name}{int(outside.sum())} tile(s) fall outside the slide encoder's {grid_size}×{grid_size} "
        f"grid (0 <= x, y < {limit} px at {GIGAPATH_MPP} mpp), e.g. level-0 {coords[first].tolist()} "
        f"at mpp {mpp}; check the file's mpp attribute (override with --mpp); the slide may also be "
        "too large for the encoder"
    )


def gigapath_cells(
    coords_level0: np.ndarray,
    mpp: float,
    tile_size_level0: float,
    slide_id: str = "",
    tile_size: int = 256,
    grid_size: int = 1000,
) -> np.ndarray:
    """Position cell (i, j) [N, 2] int64 of each tile, from level-0 top-left corners on a regular grid.

    The rule: a corner `p` lies on its grid's own lattice, `p = phase + k · tile_size_level0` with
    `k = floor(p / tile_size_level0)`; the lattice's origin `phase` (< one tile) is placed physically,
    `floor(phase at 0.5 µm/px / 256)`, and each lattice step is one cell (when a tile is 0.8-1.25 cells
    wide, `ONE_CELL_PER_TILE`), else `round(k · cells per tile)`. For exact 256-px tiles at 0.5 µm/px
    this is the official `floor(top-left at 0.5 µm/px / 256)` whatever the grid's origin (CLAM starts
    grids at the tissue's bounding box); for inexact scales (513 px at 0.2495 µm/px is 255.99 px) no two
    tiles of one grid share a cell. The cell depends only on the tile itself, so subsampling tiles never
    moves the others.
    """
    name = f"slide {slide_id!r}: " if slide_id else ""
    coords = _check_scale(name, mpp, coords_level0)
    step = float(tile_size_level0)
    if not np.isfinite(step) or step <= 0:
        raise InputError(f"{name}tile_size_level0 must be a positive number of level-0 px, got {tile_size_level0!r}")
    if not np.isfinite(coords).all() or (coords < 0).any():
        raise InputError(f"{name}tile coordinates must be finite and >= 0 (level-0 pixels)")
    scale = float(mpp) / GIGAPATH_MPP  # level-0 px -> 0.5-mpp px
    k = np.floor(coords / step)
    phase = coords - k * step
    origin_cell = np.floor(phase * scale / tile_size)
    cells_per_tile = step * scale / tile_size
    if ONE_CELL_PER_TILE[0] <= cells_per_tile <= ONE_CELL_PER_TILE[1]:
        cells = origin_cell + k
    else:
        cells = origin_cell + np.floor(k * cells_per_tile + 0.5)
    outside = ((cells < 0) | (cells >= grid_size)).any(1)
    if outside.any():
        raise _outside_error(name, outside, coords, mpp, grid_size, tile_size)
    return cells.astype(np.int64)


def to_gigapath_coords(
    coords_level0: np.ndarray,
    mpp: float,
    slide_id: str = "",
    tile_size: int = 256,
    grid_size: int = 1000,
    tile_size_level0: float | None = None,
) -> np.ndarray:
    """Level-0 (x, y) pixels [N, 2] -> 0.5-mpp pixels [N, 2] float64, checked against the position grid.

    Feeding level-0 pixels of a 0.25-mpp scan straight to the encoder doubles every position (a common
    mistake, prov-gigapath #57/#65/#116), which is why the unit conversion lives next to the model.
    With `tile_size_level0` (tiles of a grid, the way every vlm path calls it) the result is the corner
    of each tile's position cell, `gigapath_cells(...) * tile_size`; without it, points are only scaled.
    """
    if tile_size_level0 is not None:
        cells = gigapath_cells(coords_level0, mpp, tile_size_level0, slide_id, tile_size, grid_size)
        return cells.astype(np.float64) * tile_size
    name = f"slide {slide_id!r}: " if slide_id else ""
    coords = _check_scale(name, mpp, coords_level0)
    scaled = coords * (float(mpp) / GIGAPATH_MPP)
    limit = grid_size * tile_size
    outside = ~np.isfinite(scaled).all(1) | (scaled < 0).any(1) | (scaled >= limit).any(1)
    if outside.any():
        raise _outside_error(name, outside, coords, mpp, grid_size, tile_size)
    return scaled

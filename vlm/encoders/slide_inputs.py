"""What the slide encoder sees: the one path from a feature file to encoder inputs.

`vlm embed-slides`, `vlm train --features` and `vlm zeroshot --features <folder>` all call
`load_slide_inputs`, so a slide gets the same features, the same position cells and the same checks
whichever command reads it: float32 features, finite and of the encoder's width; positions by the rule of
`vlm.encoders.positions.gigapath_cells` (computed on the whole grid, before any tile subsampling, so a
subsample never moves a tile); coordinates handed over as float64 0.5-mpp pixels (the corner of each
tile's cell, exact in any float type).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm.encoders.positions import to_gigapath_coords
from vlm.errors import InputError, UsageError

log = logging.getLogger(__name__)


@dataclass
class SlideInputs:
    """One slide ready for the encoder: features [N, D] float32, coords [N, 2] float64 (0.5-mpp px)."""

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    n_tiles: int  # tiles in the file, before any subsampling
    provenance: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.features)


def subsample_rows(n: int, max_tiles: int | None, seed: int, slide_id: str) -> np.ndarray | None:
    """Sorted row indices of at most `max_tiles` tiles, or None for all.

    The draw depends only on `seed` and the slide id, so GradCache's second pass (and a resumed run)
    picks the same tiles.
    """
    if max_tiles is None or n <= max_tiles:
        return None
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(slide_id.encode())) % 2**62)
    return torch.randperm(n, generator=generator)[:max_tiles].sort().values.numpy()


def prepare_slide_inputs(
    features: np.ndarray,
    coords_level0: np.ndarray,
    mpp: float,
    tile_size_level0: float,
    slide_id: str,
    source: str = "",
    in_dim: int | None = None,
    tile_size: int = 256,
    grid_size: int = 1000,
    max_tiles: int | None = None,
    seed: int = 0,
    provenance: dict[str, object] | None = None,
) -> SlideInputs:
    """Check one slide's tile features and place its tiles on the encoder's position grid.

    Refused, naming `source` (the file): no tiles, a feature width other than `in_dim`, NaN/inf features,
    tiles outside the 1000 × 1000 cell grid.
    """
    where = f"slide {slide_id!r} ({source})" if source else f"slide {slide_id!r}"
    features = np.asarray(features)
    if features.ndim != 2:
        raise InputError(f"{where}: features have shape {features.shape}, expected [N, D]")
    if len(features) == 0:
        raise UsageError(f"{where}: no tiles; re-run `vlm tile` / `vlm embed-tiles`")
    if in_dim is not None and features.shape[1] != in_dim:
        raise InputError(
            f"{where}: features are {features.shape[1]}-d but the slide encoder expects {in_dim}-d tile "
            "features (were they extracted with another tile encoder?)"
        )
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():
        raise InputError(
            f"{where}: {int((~finite).sum())} of {len(features)} tiles have NaN/inf features (first row "
            f"{int(np.flatnonzero(~finite)[0])}); re-extract them"
        )
    try:
        coords = to_gigapath_coords(coords_level0, mpp, slide_id, tile_size, grid_size, tile_size_level0)
    except ValueError as error:
        raise InputError(f"{source}: {error}" if source else str(error)) from None
    features = features.astype(np.float32, copy=False)
    keep = subsample_rows(len(features), max_tiles, seed, slide_id)
    n_tiles = len(features)
    if keep is not None:
        features, coords = features[keep], coords[keep]
    return SlideInputs(slide_id, features, coords, n_tiles, dict(provenance or {}))


def load_slide_inputs(
    path: str | os.PathLike[str],
    in_dim: int | None = None,
    mpp: float | None = None,
    patches: str | os.PathLike[str] | None = None,
    tile_size: int = 256,
    grid_size: int = 1000,
    max_tiles: int | None = None,
    seed: int = 0,
) -> SlideInputs:
    """Read a feature file (vlm, TRIDENT, or CLAM with its `patches` folder) into checked encoder inputs."""
    from vlm.formats.features import read_features
    from vlm.io import slide_id_from_path

    path = Path(path)
    slide_id = slide_id_from_path(path)
    tiles = read_features(path, mpp=mpp, patches=patches)
    grid = tiles.grid
    provenance = {"source": str(path), "mpp": grid.mpp, "mpp_source": grid.mpp_source,
                  "tile_size_level0": grid.tile_size_level0, "tile_encoder": tiles.encoder}
    log.debug("%s: level-0 %.4g µm/px from %s", slide_id, grid.mpp, grid.mpp_source)
    return prepare_slide_inputs(
        tiles.features, grid.coords, grid.mpp, grid.tile_size_level0, slide_id, str(path), in_dim,
        tile_size, grid_size, max_tiles, seed, provenance,
    )


# The tile encoder each slide-encoder preset was trained on, by the names a feature file may record for it
# (vlm's registry name, the timm hub name, TRIDENT's encoder name). Prov-GigaPath's slide encoder was pretrained
# on its own tile encoder's features; presets without published weights (the demo's random `tiny`) expect none.
SLIDE_ENCODER_TILE_ENCODERS: dict[str, frozenset[str]] = {
    "gigapath": frozenset(
        {"gigapath", "timm:hf_hub:prov-gigapath/prov-gigapath", "hf_hub:prov-gigapath/prov-gigapath"}
    ),
}


def check_tile_encoders(
    paths: Sequence[str | os.PathLike[str]],
    slide_encoder: str | None = None,
    tile_encoder: str | None = None,
    source: Mapping[str, Any] | None = None,
) -> str | None:
    """The tile encoder the feature files record; refuses files that mix encoders or do not fit the slide encoder.

    Feature files of the same width from two tile encoders give numbers for any slide encoder, all wrong for
    one of the two. Refused, naming the odd files: a folder whose files record different tile encoders; files
    whose encoder is not the one the `slide_encoder` preset was trained on (`SLIDE_ENCODER_TILE_ENCODERS`) or
    not `tile_encoder` (what a model or an embeddings file records). Files recording none (CLAM; older
    TRIDENT) are warned about, not refused. `source`: the settings an embeddings file (or a model trained on
    one) records, whose `encoder` and `tile_encoder` fill in the other two. Every command that feeds feature
    files to a slide encoder calls it.
    """
    from vlm.formats.features import feature_encoder

    slide_encoder = slide_encoder or (source or {}).get("encoder")
    tile_encoder = tile_encoder or (source or {}).get("tile_encoder")

    recorded = {Path(path): feature_encoder(path) for path in paths}
    by_encoder: dict[str, list[Path]] = {}
    for path, encoder in recorded.items():
        if encoder is not None:
            by_encoder.setdefault(encoder, []).append(path)
    unrecorded = [path for path, encoder in recorded.items() if encoder is None]

    def named(files: list[Path]) -> str:
        return ", ".join(p.name for p in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")

    if len(by_encoder) > 1:
        common = max(by_encoder, key=lambda name: (len(by_encoder[name]), name))
        odd = "; ".join(f"{named(files)} ({name!r})" for name, files in sorted(by_encoder.items()) if name != common)
        raise InputError(
            f"the feature files mix tile encoders: {len(by_encoder[common])} record {common!r}, but {odd}; "
            "features of different encoders are not comparable: re-extract the odd files with `vlm embed-tiles "
            f"--tile-encoder {common}` or keep them in another folder"
        )
    found = next(iter(by_encoder), None)
    expected = SLIDE_ENCODER_TILE_ENCODERS.get(slide_encoder or "")
    if found is not None and expected is not None and found not in expected:
        raise InputError(
            f"the {slide_encoder!r} slide encoder was trained on {sorted(expected)[0]!r} tile features, but "
            f"{named(by_encoder[found])} record {found!r}; extract them with `vlm embed-tiles --tile-encoder "
            f"{sorted(expected)[0]}`"
        )
    if found is not None and tile_encoder is not None and found != tile_encoder:
        raise InputError(
            f"{named(by_encoder[found])} record tile encoder {found!r}, but the model's slide embeddings were made "
            f"from {tile_encoder!r} tile features; use features of {tile_encoder!r}"
        )
    if unrecorded:
        log.warning("%d feature file(s) record no tile encoder (%s; CLAM or older TRIDENT files): that they come "
                    "from %s is not checked", len(unrecorded), named(unrecorded),
                    repr(found or tile_encoder) if found or tile_encoder else "the same encoder")
    return found


def pad_batch(slides: list[SlideInputs]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad slides into features [B, L, D] float32, coords [B, L, 2] float64, mask [B, L] (True = pad)."""
    length = max(len(slide) for slide in slides)
    dim = slides[0].features.shape[1]
    features = torch.zeros(len(slides), length, dim)
    coords = torch.zeros(len(slides), length, 2, dtype=torch.float64)
    mask = torch.ones(len(slides), length, dtype=torch.bool)
    for row, slide in enumerate(slides):
        n = len(slide)
        features[row, :n] = torch.from_numpy(slide.features)
        coords[row, :n] = torch.from_numpy(slide.coords)
        mask[row, :n] = False
    return features, coords, mask

"""`vlm tile`: tissue detection and tile grids for many slides, with QC thumbnails.

Writes per slide `<slide_id>.h5` (coords + provenance, no features: `vlm embed-tiles --tiles` starts
from it) and `<slide_id>.png` (thumbnail with tissue outline and tiles). Slides are processed in
parallel worker processes (`workers`), each slide in one process.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

from vlm.batch import Batch, BatchReport, Shard
from vlm.formats.features import is_written, write_tile_grid
from vlm.io import make_output_folder, slide_id_from_path
from vlm.wsi.readers import check_reader
from vlm.wsi.slide import open_slide
from vlm.wsi.tiling import TilingParams, tile_slide, write_qc_thumbnail


def _tile_one(slide_path: Path, out_dir: Path, params: TilingParams, mpp: float | None, reader: str) -> None:
    slide_id = slide_id_from_path(slide_path)
    with open_slide(slide_path, mpp=mpp, reader=reader) as slide:
        result = tile_slide(slide, params)
        # The thumbnail first: the .h5 marks the slide done, so it must be the last file written.
        write_qc_thumbnail(out_dir / f"{slide_id}.png", slide, result)
    write_tile_grid(out_dir / f"{slide_id}.h5", result.grid)


def tile_slides(
    slides: Sequence[Path],
    out_dir: str | os.PathLike[str],
    params: TilingParams = TilingParams(),
    mpp: float | None = None,
    workers: int = 1,
    shard: Shard = Shard(),
    progress: bool = True,
    overwrite: bool = False,
    reader: str = "auto",
) -> BatchReport:
    """Tile every slide whose `<slide_id>.h5` is not yet in `out_dir`; the batch rules are `vlm.batch.Batch`'s.

    `reader` picks the pixel reader (`vlm.wsi.readers`: "auto", "openslide", "tifffile")."""
    check_reader(reader)
    out = Path(out_dir)
    make_output_folder(out)
    batch = Batch(
        slides,
        key=slide_id_from_path,
        is_done=lambda path: is_written(out / f"{slide_id_from_path(path)}.h5"),
        folder=out,
        desc="tiling",
        shard=shard,
        progress=progress,
        overwrite=overwrite,
    )
    return batch.run(functools.partial(_tile_one, out_dir=out, params=params, mpp=mpp, reader=reader), workers=workers)

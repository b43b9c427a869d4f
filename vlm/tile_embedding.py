"""`vlm embed-tiles`: tile features for many slides, one `<slide_id>.h5` each.

Tiles are read by DataLoader worker processes (`workers`) while the main process runs the encoder
under `torch.inference_mode` (and fp16/bf16 autocast on CUDA). The tile grid comes from a `vlm tile`
output folder when given (`tiles_dir`), else it is computed on the fly with the same parameters.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vlm.batch import BatchReport, Shard, run_batch
from vlm.device import autocast, autocast_dtype, resolve_device
from vlm.encoders.tile import TileEncoder
from vlm.features import TileFeatures, TileGrid, read_tile_grid, write_features
from vlm.io import slide_id_from_path
from vlm.wsi.dataset import TileDataset
from vlm.wsi.slide import open_slide
from vlm.wsi.tiling import TilingParams, read_plan, tile_slide


@torch.inference_mode()
def embed_grid(
    slide_path: str | os.PathLike[str],
    grid: TileGrid,
    encoder: TileEncoder,
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = False,
) -> np.ndarray:
    """Features [N, D] (float32) for the tiles of `grid`, in grid order (`encoder` already on `device`)."""
    device = resolve_device(device)
    with open_slide(slide_path, mpp=grid.mpp) as slide:
        plan = read_plan(slide, grid.tile_size_level0, grid.tile_size)
    dataset = TileDataset(slide_path, grid.coords, plan, grid.mpp, transform=encoder.transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    features = np.empty((len(dataset), encoder.output_dim), dtype=np.float32)
    for images, indices in tqdm(loader, desc=slide_id_from_path(slide_path), unit="batch", disable=not progress,
                                leave=False):
        with autocast(device, precision):
            output = encoder(images.to(device, non_blocking=True))
        features[indices.numpy()] = output.float().cpu().numpy()
    return features


def _embed_one(
    slide_path: Path,
    out_dir: Path,
    encoder: TileEncoder,
    device: torch.device,
    precision: str,
    batch_size: int,
    workers: int,
    params: TilingParams,
    tiles_dir: Path | None,
    mpp: float | None,
    dtype: str,
) -> None:
    slide_id = slide_id_from_path(slide_path)
    if tiles_dir is not None:
        grid = read_tile_grid(tiles_dir / f"{slide_id}.h5", mpp=mpp)
    else:
        with open_slide(slide_path, mpp=mpp) as slide:
            grid = tile_slide(slide, params).grid
    features = embed_grid(slide_path, grid, encoder, device, precision, batch_size, workers)
    write_features(out_dir / f"{slide_id}.h5", TileFeatures(grid, features, encoder=encoder.name), dtype=dtype)


def embed_tiles(
    slides: Sequence[Path],
    out_dir: str | os.PathLike[str],
    encoder: TileEncoder,
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    params: TilingParams = TilingParams(),
    tiles_dir: str | os.PathLike[str] | None = None,
    mpp: float | None = None,
    dtype: str = "float32",
    shard: Shard = Shard(),
    progress: bool = True,
    overwrite: bool = False,
) -> BatchReport:
    """Embed the tiles of each slide whose `<slide_id>.h5` is not yet in `out_dir`.

    `device` ("auto", "cpu", "cuda:1", …) and `precision` ("auto", "fp32", "fp16", "bf16") are resolved by
    `vlm.device`; an impossible pair (fp16 on CPU) is refused before any slide is read.
    """
    device = resolve_device(device)
    autocast_dtype(device, precision)
    if dtype not in ("float32", "float16"):
        raise ValueError(f"feature dtype must be float32 or float16, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder = encoder.to(device).eval()
    return run_batch(
        slides,
        key=slide_id_from_path,
        output_of=lambda path: out / f"{slide_id_from_path(path)}.h5",
        process=functools.partial(
            _embed_one, out_dir=out, encoder=encoder, device=device, precision=precision,
            batch_size=batch_size, workers=workers, params=params,
            tiles_dir=None if tiles_dir is None else Path(tiles_dir), mpp=mpp, dtype=dtype,
        ),
        out_dir=out,
        desc="embedding tiles",
        shard=shard,
        progress=progress,
        overwrite=overwrite,
    )

"""Benchmark: `vlm tile` + tile reading vs a naive single-process `read_region` loop.

Writes a ~40k x 40k px, 0.25-mpp JPEG pyramidal TIFF (tissue in an irregular blob covering about a
third of the slide), then measures in one process:
- tissue detection alone, and `tile_slide` (detection + grid) — the `vlm tile` work per slide;
- reading N tissue tiles at 0.5 mpp through `TileDataset` + DataLoader with 2 workers (level 1, no
  resampling) against the naive loop: OpenSlide `read_region` at level 0 (512 px) + resize to 256.

    python bench/tiling.py [--size 40000] [--tiles 4000] [--workers 2] [--keep PATH]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from vlm.wsi.slide import open_slide
from vlm.wsi.synthetic import write_pyramidal_tiff
from vlm.wsi.tiling import TilingParams, read_plan, tile_slide
from vlm.wsi.tissue import detect_tissue


def blob_region(size: int):  # noqa: ANN201 - a vlm.wsi.synthetic.RegionFn
    """Tissue inside a wavy ellipse, textured with per-pixel noise; white glass elsewhere."""

    def region(downsample: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        ys = (np.arange(y0, y0 + height) * downsample / size)[:, None]
        xs = (np.arange(x0, x0 + width) * downsample / size)[None, :]
        angle = np.arctan2(ys - 0.5, xs - 0.5)
        radius = np.hypot((xs - 0.5) / 0.9, ys - 0.5)
        inside = radius < 0.33 + 0.05 * np.sin(5 * angle)
        tile = np.full((height, width, 3), 242, np.uint8)
        if inside.any():
            rng = np.random.default_rng(x0 * 7919 + y0 + downsample)
            noise = rng.integers(-30, 30, size=(height, width, 1), dtype=np.int16)
            stain = np.clip(np.array([190, 100, 165], np.int16) + noise, 0, 255).astype(np.uint8)
            tile[inside] = stain[inside]
        return tile

    return region


def naive_read(path: Path, coords: np.ndarray, size0: int, tile_size: int) -> float:
    start = time.perf_counter()
    slide = openslide.OpenSlide(str(path))
    for x, y in coords:
        tile = slide.read_region((int(x), int(y)), 0, (size0, size0)).convert("RGB")
        tile.resize((tile_size, tile_size), Image.Resampling.BILINEAR)
    slide.close()
    return time.perf_counter() - start


def loader_read(path: Path, coords: np.ndarray, mpp: float, size0: int, tile_size: int, workers: int) -> float:
    # imported here (not timed): bench/readers.py takes blob_region from this module and needs no torch
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    from vlm.wsi.dataset import TileDataset

    start = time.perf_counter()
    with open_slide(path) as slide:
        plan = read_plan(slide, size0, tile_size)
    print(f"vlm read plan: level {plan.level}, {plan.read_size} px, resize: {plan.needs_resize}")
    dataset = TileDataset(path, coords, plan, mpp, transform=pil_to_tensor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers)
    n = sum(len(indices) for _, indices in loader)
    assert n == len(coords)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40_000, help="level-0 side in px")
    parser.add_argument("--tiles", type=int, default=4000, help="tissue tiles read by each reader")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="write/reuse the slide at this path")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "bench_025.tiff"
        if not path.exists():
            start = time.perf_counter()
            write_pyramidal_tiff(path, (args.size, args.size), blob_region(args.size), mpp=0.25, n_levels=5)
            print(f"wrote {path.name}: {args.size}x{args.size} px, 0.25 mpp, JPEG, 5 levels, "
                  f"{path.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - start:.1f} s")

        params = TilingParams()
        with open_slide(path) as slide:
            size0 = round(params.tile_size * params.target_mpp / slide.mpp)
            start = time.perf_counter()
            detect_tissue(slide, downsample=size0 / 16)
            detect_s = time.perf_counter() - start
            start = time.perf_counter()
            grid = tile_slide(slide, params).grid
            tile_s = time.perf_counter() - start
        print(f"tissue detection: {detect_s:.2f} s; tile grid (detection + grid): {tile_s:.2f} s, "
              f"{len(grid)} tissue tiles")

        coords = grid.coords[np.random.default_rng(0).permutation(len(grid))[: args.tiles]]
        coords = coords[np.lexsort((coords[:, 0], coords[:, 1]))]  # row-major, as the grid is stored
        naive_s = naive_read(path, coords, size0, params.tile_size)
        ours_s = loader_read(path, coords, grid.mpp, size0, params.tile_size, args.workers)
        one_process_s = loader_read(path, coords, grid.mpp, size0, params.tile_size, 0)
        naive_rate, ours_rate = len(coords) / naive_s, len(coords) / ours_s
        print(f"vlm TileDataset, same read plan, main process only:     {len(coords) / one_process_s:8.1f} tiles/s")
        print(f"naive read_region loop (level 0, 512 px + resize, 1 process): {naive_rate:8.1f} tiles/s")
        print(f"vlm TileDataset + DataLoader ({args.workers} workers):                {ours_rate:8.1f} tiles/s")
        print(f"speed-up: {ours_rate / naive_rate:.2f}x (goal >= 1.8x)")
        end_to_end = len(coords) / (tile_s + ours_s)
        print(f"vlm tile + read, end to end: {end_to_end:.1f} tiles/s "
              f"vs naive {len(coords) / naive_s:.1f} tiles/s (naive skips tissue detection)")


if __name__ == "__main__":
    main()

"""Benchmark tile readers on the CPU: OpenSlide (vlm's reader) vs tiffslide, worker processes vs threads.

Writes a JPEG pyramidal TIFF with `vlm.wsi.synthetic.write_pyramidal_tiff` (0.25 mpp, tissue in a blob),
tiles it with `vlm.wsi.tiling.tile_slide` and reads the same tissue tiles with vlm's read plan (256 px at
0.5 mpp: level 1, no resize) as RGB arrays, in every (reader, mode) pair:

- `main`: one thread in this process (the reference rate of one core);
- `processes`: `--workers` processes, each with its own handle (how `vlm embed-tiles --workers` reads);
- `threads`: `--workers` threads sharing one handle (OpenSlide and tiffslide are both thread-safe;
  OpenSlide's ctypes calls and tiffslide's codecs release the GIL while decoding).

Rounds are interleaved (every pair once, then again), so each figure has its baselines from the same
minutes of machine load. Also checks that both readers return the same pixels (max |difference|).
tiffslide is optional and not a vlm dependency (`pip install tiffslide`); without it only OpenSlide runs.

    python bench/readers.py [--size 16000] [--tiles 2000] [--workers 2] [--rounds 2] [--json results.jsonl]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tiling import blob_region  # bench/tiling.py: the same synthetic tissue

from vlm.wsi.slide import open_slide
from vlm.wsi.synthetic import write_pyramidal_tiff
from vlm.wsi.tiling import TilingParams, read_plan, tile_slide

log = logging.getLogger("bench.readers")
Reader = Callable[[int, int], np.ndarray]


def open_reader(name: str, path: Path, level: int, size: int) -> Reader:
    """A function (x, y) -> RGB uint8 [size, size, 3] reading at `level` with one open handle."""
    if name == "openslide":
        from vlm.wsi.slide import Slide

        slide = Slide(path, mpp=0.25)
        return lambda x, y: np.asarray(slide.read_region_rgb((x, y), level, (size, size)))
    import tiffslide

    slide = tiffslide.TiffSlide(path)
    return lambda x, y: np.asarray(slide.read_region((x, y), level, (size, size), as_array=True))[..., :3]


def _read_chunk(args: tuple[str, str, int, int, np.ndarray]) -> int:
    """Worker-process side: open a handle, read the chunk's tiles, return how many were read."""
    name, path, level, size, coords = args
    read = open_reader(name, Path(path), level, size)
    return sum(read(int(x), int(y)).shape[0] > 0 for x, y in coords)


def _started(_: int) -> int:
    return 0


def rate(name: str, mode: str, path: Path, coords: np.ndarray, level: int, size: int, workers: int) -> float:
    """Tiles per second of one (reader, mode) over all `coords`; worker processes are started (and have
    imported vlm) before the clock starts, as a DataLoader's persistent workers would be."""
    pool = ProcessPoolExecutor(workers) if mode == "processes" else None
    if pool is not None:
        list(pool.map(_started, range(workers * 2)))
    start = time.perf_counter()
    if mode == "main":
        read = open_reader(name, path, level, size)
        n = sum(read(int(x), int(y)).shape[0] > 0 for x, y in coords)
    elif mode == "threads":
        read = open_reader(name, path, level, size)
        with ThreadPoolExecutor(workers) as pool:
            n = sum(tile.shape[0] > 0 for tile in pool.map(lambda xy: read(int(xy[0]), int(xy[1])), coords))
    else:  # processes: contiguous chunks, as DataLoader workers get batches of a slide's tiles
        chunks = np.array_split(coords, workers * 4)
        n = sum(pool.map(_read_chunk, [(name, str(path), level, size, chunk) for chunk in chunks]))
    seconds = time.perf_counter() - start
    if pool is not None:
        pool.shutdown()
    assert n == len(coords)
    return len(coords) / seconds


def _label(mode: str, workers: int) -> str:
    if mode == "main":
        return "1 thread"
    return f"{workers} {mode if workers > 1 else mode.removesuffix('es' if mode == 'processes' else 's')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16_000, help="level-0 side in px")
    parser.add_argument("--tiles", type=int, default=2000, help="tissue tiles read per case")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every case")
    parser.add_argument("--json", type=Path, default=None, help="append result rows (JSON lines) here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    readers = ["openslide"]
    if importlib.util.find_spec("tiffslide") is None:
        log.info("tiffslide is not installed: only OpenSlide is measured (pip install tiffslide to compare)")
    else:
        readers.append("tiffslide")
    modes = ["main", "processes", "threads"]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "readers_025.tiff"
        write_pyramidal_tiff(path, (args.size, args.size), blob_region(args.size), mpp=0.25, n_levels=5)
        params = TilingParams()
        with open_slide(path) as slide:
            size0 = round(params.tile_size * params.target_mpp / slide.mpp)
            plan = read_plan(slide, size0, params.tile_size)
            grid = tile_slide(slide, params).grid
        coords = grid.coords[np.random.default_rng(0).permutation(len(grid))[: args.tiles]]
        coords = coords[np.lexsort((coords[:, 0], coords[:, 1]))]  # row-major, as the grid is stored
        log.info("slide %d px, %d tissue tiles, read plan: level %d, %d px, resize %s; %d tiles per case",
                 args.size, len(grid), plan.level, plan.read_size, plan.needs_resize, len(coords))  # fmt: skip
        if len(readers) > 1:  # same pixels? (both decode the same JPEG tiles; libjpeg versions may round apart)
            a, b = (open_reader(name, path, plan.level, plan.read_size) for name in readers)
            diff = max(int(np.abs(a(int(x), int(y)).astype(int) - b(int(x), int(y))).max()) for x, y in coords[:50])
            log.info("max |openslide - tiffslide| over 50 tiles: %d (of 255)", diff)
        for name in readers:  # warm the page cache and the imports
            rate(name, "main", path, coords[:50], plan.level, plan.read_size, 1)
        figures: dict[tuple[str, str], list[float]] = {(name, mode): [] for name in readers for mode in modes}
        for round_ in range(args.rounds):
            for mode in modes:
                for name in readers:
                    value = rate(name, mode, path, coords, plan.level, plan.read_size, args.workers)
                    figures[name, mode].append(value)
                    log.info("round %d  %-9s %-9s %8.1f tiles/s", round_ + 1, name, mode, value)
    log.info("\n| reader | mode | tiles/s (each round) |\n|---|---|---|")
    for (name, mode), values in figures.items():
        workers = _label(mode, args.workers)
        log.info("| %s | %s | %s |", name, workers, " / ".join(f"{v:.0f}" for v in values))
    if args.json:
        with open(args.json, "a") as handle:
            for (name, mode), values in figures.items():
                workers = _label(mode, args.workers)
                row = {"bench": "readers", "case": f"{name}, {workers}", "device": "CPU",
                       "value": round(statistics.median(values), 1), "unit": "tiles/s"}  # fmt: skip
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

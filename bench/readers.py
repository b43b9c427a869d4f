"""Benchmark tile readers on the CPU: vlm's two readers (`--reader openslide` / `tifffile`) and, where
installed, tiffslide, fastslide and cuCIM (never vlm dependencies), worker processes vs threads.

Writes a JPEG pyramidal TIFF with `vlm.wsi.synthetic.write_pyramidal_tiff` (0.25 mpp, tissue in a blob) and
reads RGB arrays [256, 256, 3] in every (reader, mode) pair, from one of two read patterns:

- `--pattern grid` (default): the tissue tiles of `vlm.wsi.tiling.tile_slide` with vlm's read plan (256 px at
  0.5 mpp: level 1, no resize), what `vlm embed-tiles` reads;
- `--pattern random`: 256-px reads at random level-0 positions (tile borders crossed: 4 tiles decoded per
  read), the pattern of the peer comparisons in the issue tracker.

Modes:

- `main`: one thread in this process (the reference rate of one core);
- `processes`: `--workers` processes, each with its own handle (how `vlm embed-tiles --workers` reads);
- `threads`: `--workers` threads sharing one handle (all of these readers are thread-safe and release the GIL
  while decoding). fastslide and cuCIM also decode a region's tiles on their own thread pools in every mode.

Rounds are interleaved (every pair once, then again), so each figure has its baselines from the same
minutes of machine load. Also prints each reader's max |difference| from OpenSlide over 50 reads.

    python bench/readers.py [--size 16000] [--tiles 2000] [--pattern grid|random] [--workers 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

# Only numpy and the standard library at module level: the `processes` workers are spawned, so each one
# imports this module again (torch and skimage, through bench/tiling.py and vlm.wsi.tiling, cost seconds).
log = logging.getLogger("bench.readers")
Reader = Callable[[int, int], np.ndarray]


VLM_READERS = ("openslide", "tifffile")  # vlm's own, `Slide(reader=...)`
OPTIONAL_READERS = {"tiffslide": "tiffslide", "fastslide": "fastslide", "cucim": "cucim"}  # name: module


def available_readers() -> list[str]:
    """vlm's readers, then the optional ones that import here (each logged when missing)."""
    found = list(VLM_READERS)
    for name, module in OPTIONAL_READERS.items():
        if importlib.util.find_spec(module) is None:
            log.info("%s is not installed: not measured (pip install %s to compare)", name, name)
        else:
            found.append(name)
    return found


def open_reader(name: str, path: Path, level: int, size: int) -> Reader:
    """A function (x, y) -> RGB uint8 [size, size, 3] reading at `level` (x, y level-0) with one open handle."""
    if name in VLM_READERS:
        from vlm.wsi.slide import Slide

        slide = Slide(path, mpp=0.25, reader=name)
        return lambda x, y: slide.read_region_array((x, y), level, (size, size))
    if name == "tiffslide":
        import tiffslide

        slide = tiffslide.TiffSlide(path)
        return lambda x, y: np.asarray(slide.read_region((x, y), level, (size, size), as_array=True))[..., :3]
    if name == "fastslide":
        import fastslide

        fast = fastslide.FastSlide.from_file_path(str(path))
        downsample = round(fast.level_downsamples[level])  # fastslide takes level-native coordinates
        return lambda x, y: fast.read_region((x // downsample, y // downsample), level, (size, size)).numpy()[..., :3]
    from cucim import CuImage

    image = CuImage(str(path))
    return lambda x, y: np.asarray(image.read_region((x, y), (size, size), level))[..., :3]


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
    # spawned, not forked: a reader with its own thread pool (fastslide) deadlocks in a forked child
    spawn = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=spawn) if mode == "processes" else None
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
    """The table's name of a mode: `main` is the calling thread, the others say how many workers."""
    if mode == "main":
        return "main thread"
    if mode == "processes":
        return f"{workers} process{'es' if workers > 1 else ''}"
    return f"{workers} pool thread{'s' if workers > 1 else ''}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16_000, help="level-0 side in px")
    parser.add_argument("--tiles", type=int, default=2000, help="tissue tiles read per case")
    parser.add_argument("--pattern", choices=["grid", "random"], default="grid",
                        help="tissue tiles of vlm's grid, or random level-0 256-px reads")
    parser.add_argument("--readers", nargs="+", default=None, help="measure only these (default: all found)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every case")
    parser.add_argument("--json", type=Path, default=None, help="append result rows (JSON lines) here")
    return parser.parse_args(argv)


def main() -> None:
    from tiling import blob_region  # bench/tiling.py: the same synthetic tissue

    from vlm.wsi.slide import open_slide
    from vlm.wsi.synthetic import write_pyramidal_tiff
    from vlm.wsi.tiling import TilingParams, read_plan, tile_slide

    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    readers = [name for name in available_readers() if args.readers is None or name in args.readers]
    modes = ["main", "processes", "threads"]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "readers_025.tiff"
        write_pyramidal_tiff(path, (args.size, args.size), blob_region(args.size), mpp=0.25, n_levels=5)
        params = TilingParams()
        with open_slide(path) as slide:
            size0 = round(params.tile_size * params.target_mpp / slide.mpp)
            plan = read_plan(slide, size0, params.tile_size)
            grid = tile_slide(slide, params).grid
        rng = np.random.default_rng(0)
        if args.pattern == "grid":
            coords = grid.coords[rng.permutation(len(grid))[: args.tiles]]
            coords = coords[np.lexsort((coords[:, 0], coords[:, 1]))]  # row-major, as the grid is stored
            level, size = plan.level, plan.read_size
        else:
            coords = rng.integers(0, args.size - 256, (args.tiles, 2))
            level, size = 0, 256
        log.info("slide %d px, %d tissue tiles, read plan: level %d, %d px, resize %s; %d %s reads per case",
                 args.size, len(grid), level, size, plan.needs_resize, len(coords), args.pattern)
        reference = open_reader("openslide", path, level, size)
        for name in readers[1:]:  # same pixels? (the same JPEG tiles; other decoders may round apart)
            other = open_reader(name, path, level, size)
            diff = max(int(np.abs(reference(int(x), int(y)).astype(int) - other(int(x), int(y))).max())
                       for x, y in coords[:50])
            log.info("max |openslide - %s| over 50 reads: %d (of 255)", name, diff)
        for name in readers:  # warm the page cache and the imports
            rate(name, "main", path, coords[:50], level, size, 1)
        figures: dict[tuple[str, str], list[float]] = {(name, mode): [] for name in readers for mode in modes}
        for round_ in range(args.rounds):
            for mode in modes:
                for name in readers:
                    value = rate(name, mode, path, coords, level, size, args.workers)
                    figures[name, mode].append(value)
                    log.info("round %d  %-9s %-9s %8.1f tiles/s", round_ + 1, name, mode, value)
    log.info("\n| reader | mode | reads/s (each round) | vs OpenSlide (median) |\n|---|---|---|---|")
    for (name, mode), values in figures.items():
        workers = _label(mode, args.workers)
        ratio = statistics.median(values) / statistics.median(figures["openslide", mode])
        log.info("| %s | %s | %s | %.2fx |", name, workers, " / ".join(f"{v:.0f}" for v in values), ratio)
    if args.json:
        with open(args.json, "a") as handle:
            for (name, mode), values in figures.items():
                workers = _label(mode, args.workers)
                row = {"bench": "readers", "case": f"{name}, {workers}, {args.pattern}", "device": "CPU",
                       "value": round(statistics.median(values), 1), "unit": "tiles/s"}
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

"""Torch datasets of slide tiles for DataLoader worker processes: one slide, or a stream over many.

OpenSlide handles are not picklable and must not be shared across processes, so each worker opens its
own handle on first use (keyed by process id). Reading happens in the workers; the main process only
runs the encoder, which is what makes `--workers` pay off.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlm.errors import UsageError
from vlm.formats.features import TileGrid, read_tile_grid
from vlm.wsi.slide import Slide
from vlm.wsi.tiling import ReadPlan, TilingParams, read_plan, tile_slide


class TileDataset(torch.utils.data.Dataset):
    """Item i is (transform(tile i), i), tile i read at `plan.level` and resized to `plan.tile_size`."""

    def __init__(
        self,
        slide_path: str | os.PathLike[str],
        coords: np.ndarray,  # [N, 2] level-0 (x, y)
        plan: ReadPlan,
        mpp: float,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        reader: str = "auto",
    ) -> None:
        self.slide_path = Path(slide_path)
        self.reader = reader
        self.coords = np.asarray(coords, dtype=np.int64)
        self.plan = plan
        self.mpp = mpp
        self.transform = transform
        self._slide: Slide | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def _open(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():
            self._slide = Slide(self.slide_path, mpp=self.mpp, reader=self.reader)
            self._pid = os.getpid()
        return self._slide

    def read_tile(self, index: int) -> Image.Image:
        x, y = (int(v) for v in self.coords[index])
        size = self.plan.read_size
        tile = self._open().read_region_rgb((x, y), self.plan.level, (size, size))
        if self.plan.needs_resize:
            tile = tile.resize((self.plan.tile_size, self.plan.tile_size), Image.Resampling.BILINEAR)
        return tile

    def read_tile_array(self, index: int) -> np.ndarray:
        """Tile `index` as RGB uint8 [tile_size, tile_size, 3]; PIL only when it must be resized."""
        if self.plan.needs_resize:
            return np.asarray(self.read_tile(index))
        x, y = (int(v) for v in self.coords[index])
        size = self.plan.read_size
        return self._open().read_region_array((x, y), self.plan.level, (size, size))

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        tile = self.read_tile(index)
        return (self.transform(tile) if self.transform is not None else tile), index

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
        self._slide, self._pid = None, None

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_slide"], state["_pid"] = None, None  # each worker opens its own handle
        return state


@dataclass(frozen=True)
class SlideJob:
    """One slide of a tile stream: where its tile grid comes from.

    `grid` is used as is; else `grid_path` (a `vlm tile` output) is read; else the grid is computed with
    `params`. Grids are resolved inside the workers, so tissue detection overlaps other slides' encoding.
    """

    index: int
    path: Path
    grid: TileGrid | None = None
    grid_path: Path | None = None
    params: TilingParams = field(default_factory=TilingParams)
    mpp: float | None = None
    reader: str = "auto"

    def resolve(self) -> tuple[TileGrid, ReadPlan]:
        if self.grid is not None:
            grid = self.grid
        elif self.grid_path is not None:
            grid = read_tile_grid(self.grid_path, mpp=self.mpp)
        else:
            with Slide(self.path, mpp=self.mpp, reader=self.reader) as slide:
                grid = tile_slide(slide, self.params).grid
        with Slide(self.path, mpp=grid.mpp, reader="openslide") as slide:  # levels only: no pixels read
            plan = read_plan(slide, grid.tile_size_level0, grid.tile_size)
        return grid, plan


@dataclass
class TileChunk:
    """A work item of a tile stream: `tiles` [n, H, W, 3] uint8 (or transformed [n, 3, h, w] float) of one slide.

    `start` is the index of the first tile in the slide's grid, `n_tiles` the slide's tile count; the chunk
    that starts the slide carries its `grid`. A failed slide is sent as a chunk with `error` set and no tiles.
    """

    job: int
    start: int
    n_tiles: int
    tiles: torch.Tensor | None
    grid: TileGrid | None = None
    error: str | None = None

    def pin_memory(self) -> TileChunk:  # called by DataLoader's pin-memory thread
        if self.tiles is not None:
            self.tiles = self.tiles.pin_memory()
        return self


class TileStream(torch.utils.data.IterableDataset):
    """The tiles of many slides as one stream of chunks, split across DataLoader workers.

    Chunk k of the whole stream (counted over all slides in order) goes to worker k % workers; DataLoader
    asks its workers in the same rotation, so chunks arrive in stream order and the next slide's tiles are
    read while the current one's are still being encoded. Every worker resolves every slide's grid (cheap
    next to reading its tiles) so that all agree on the chunking without talking to each other; only the
    worker owning a slide's first chunk reports a slide that cannot be opened or tiled.
    Without transforms tiles stay uint8 HWC (4x smaller than float, for the encoder's transform on the
    device); `transform` transforms each PIL tile here (encoders whose transform has no tensor twin), and
    `batch_transform` each uint8 chunk here (the tensor transform, when the encoder runs on the CPU).
    """

    def __init__(
        self,
        jobs: Sequence[SlideJob],
        chunk_size: int = 16,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if chunk_size < 1:
            raise UsageError(f"chunk_size must be >= 1, got {chunk_size}")
        self.jobs = list(jobs)
        self.chunk_size = chunk_size
        self.transform = transform
        self.batch_transform = batch_transform

    def __iter__(self) -> Iterator[TileChunk]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        counter = 0  # chunks of the whole stream so far
        for job in self.jobs:
            owner = counter % workers
            try:
                grid, plan = job.resolve()
            except Exception as error:  # reported once, by the owner; the stream goes on
                if worker == owner:
                    yield TileChunk(job.index, 0, 0, None, error=f"{type(error).__name__}: {error}")
                counter += 1
                continue
            n = len(grid)
            n_chunks = max(1, -(-n // self.chunk_size))
            mine = [c for c in range(n_chunks) if (counter + c) % workers == worker]
            counter += n_chunks
            if not mine:
                continue
            dataset = TileDataset(job.path, grid.coords, plan, grid.mpp, transform=self.transform, reader=job.reader)
            try:
                for c in mine:
                    start = c * self.chunk_size
                    stop = min(n, start + self.chunk_size)
                    if self.transform is not None:
                        tiles = [dataset[i][0] for i in range(start, stop)]
                        batch = torch.stack(tiles) if tiles else torch.empty(0)
                    else:
                        tiles = [dataset.read_tile_array(i) for i in range(start, stop)]
                        batch = torch.from_numpy(np.stack(tiles)) if tiles else torch.empty(0)
                        if self.batch_transform is not None and tiles:
                            batch = self.batch_transform(batch)
                    yield TileChunk(job.index, start, n, batch, grid if c == 0 else None)
            except Exception as error:
                yield TileChunk(job.index, 0, n, None, error=f"{type(error).__name__}: {error}")
            finally:
                dataset.close()

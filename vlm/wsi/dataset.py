"""A torch Dataset of the tiles of one slide, for DataLoader worker processes.

OpenSlide handles are not picklable and must not be shared across processes, so each worker opens its
own handle on first use (keyed by process id). Reading happens in the workers; the main process only
runs the encoder, which is what makes `--workers` pay off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlm.wsi.slide import Slide
from vlm.wsi.tiling import ReadPlan


class TileDataset(torch.utils.data.Dataset):
    """Item i is (transform(tile i), i), tile i read at `plan.level` and resized to `plan.tile_size`."""

    def __init__(
        self,
        slide_path: str | os.PathLike[str],
        coords: np.ndarray,  # [N, 2] level-0 (x, y)
        plan: ReadPlan,
        mpp: float,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        self.slide_path = Path(slide_path)
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
            self._slide = Slide(self.slide_path, mpp=self.mpp)
            self._pid = os.getpid()
        return self._slide

    def read_tile(self, index: int) -> Image.Image:
        x, y = (int(v) for v in self.coords[index])
        size = self.plan.read_size
        tile = self._open().read_region_rgb((x, y), self.plan.level, (size, size))
        if self.plan.needs_resize:
            tile = tile.resize((self.plan.tile_size, self.plan.tile_size), Image.Resampling.BILINEAR)
        return tile

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        tile = self.read_tile(index)
        return (self.transform(tile) if self.transform is not None else tile), index

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_slide"], state["_pid"] = None, None  # each worker opens its own handle
        return state

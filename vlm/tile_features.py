"""`vlm embed-tiles`: tile features for many slides, one `<slide_id>.h5` each, from one continuous tile stream.

One DataLoader over a `TileStream` spans every slide of the batch: its persistent worker processes read chunks
of a few tiles (uint8) and keep reading the next slide while the main process encodes the current one, so the
device never waits for a per-slide start-up. The encoder's resize / crop / normalise (`TensorTransform`, pixels
equal to the PIL path to +-1 grey level) runs on the GPU on CUDA, on uint8 tiles copied from pinned memory, and
in the reading workers on the CPU; encoders whose transform has no tensor twin get their PIL transform in the
workers. Encoder batches fill across slide boundaries; features accumulate on the device and are copied back
once per slide (no synchronisation per batch), then written atomically. The tile grid comes from a
`vlm tile` output folder when given (`tiles_dir`), else it is computed on the fly with the same parameters.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vlm.batch import Batch, BatchReport, Shard, check_finite_output
from vlm.device import autocast, autocast_dtype, resolve_device
from vlm.encoders.tile import TileEncoder, tensor_transform
from vlm.errors import UsageError
from vlm.formats.features import TileFeatures, TileGrid, is_written, write_features
from vlm.io import make_output_folder, slide_id_from_path
from vlm.wsi.dataset import SlideJob, TileChunk, TileStream
from vlm.wsi.readers import check_reader
from vlm.wsi.tiling import TilingParams

log = logging.getLogger(__name__)

CHUNK_SIZE = 16  # tiles per work item: small enough to spread a biopsy over all workers


@dataclass
class SlideResult:
    """One slide out of the stream: its grid and features [N, D] float32, or why it failed."""

    job: int
    grid: TileGrid | None = None
    features: np.ndarray | None = None
    error: str | None = None


@dataclass
class _Pending:
    """A slide whose tiles are in flight: features accumulate on the device."""

    n_tiles: int
    features: torch.Tensor
    grid: TileGrid | None = None
    done: int = 0


@dataclass
class _Batch:
    tiles: list[torch.Tensor] = field(default_factory=list)
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (job, start, n)
    size: int = 0


class _Encoding:
    """One pass of the stream: encoder batches across slide boundaries, per-slide accumulators on the device."""

    def __init__(
        self,
        encoder: TileEncoder,
        forward: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        precision: str,
        batch_size: int,
        pad: bool,
        on_tiles: Callable[[int], object] | None,
        transform_on: str | None,
    ) -> None:
        self.encoder, self.forward, self.device, self.precision = encoder, forward, device, precision
        self.batch_size, self.pad, self.on_tiles = batch_size, pad, on_tiles
        # On CUDA the tensor transform runs on the device; on the CPU in the reading workers (spare cores).
        transform = tensor_transform(encoder.transform)
        on_device = device.type == "cuda" if transform_on is None else transform_on == "device"
        self.device_transform = transform if on_device else None
        self.worker_transform = None if on_device else transform
        self.pending: dict[int, _Pending] = {}
        self.failed: set[int] = set()
        self.finished: set[int] = set()
        self.batch = _Batch()

    def fail(self, jobs: Iterable[int], message: str) -> Iterator[SlideResult]:
        for job in jobs:
            if job not in self.failed and job not in self.finished:
                self.failed.add(job)
                self.pending.pop(job, None)
                yield SlideResult(job, error=message)

    def add(self, chunk: TileChunk) -> Iterator[SlideResult]:
        if chunk.job in self.failed or chunk.job in self.finished:
            return
        if chunk.error is not None:
            yield from self.fail([chunk.job], chunk.error)
            return
        slide = self.pending.get(chunk.job)
        if slide is None:
            features = torch.empty(chunk.n_tiles, self.encoder.output_dim, dtype=torch.float32, device=self.device)
            slide = self.pending[chunk.job] = _Pending(chunk.n_tiles, features)
        if chunk.grid is not None:
            slide.grid = chunk.grid
        n = len(chunk.tiles)
        if n == 0:
            yield from self.complete()
            return
        tiles = chunk.tiles.to(self.device, non_blocking=True)  # from pinned memory on CUDA
        batch = self.batch
        if batch.size and (batch.size + n > self.batch_size or tiles.shape[1:] != batch.tiles[0].shape[1:]):
            yield from self.flush()
        self.batch.tiles.append(tiles)
        self.batch.segments.append((chunk.job, chunk.start, n))
        self.batch.size += n
        if self.batch.size >= self.batch_size:
            yield from self.flush()

    def flush(self) -> Iterator[SlideResult]:
        current, self.batch = self.batch, _Batch()
        if not current.size:
            return
        try:
            images = torch.cat(current.tiles)
            if self.device_transform is not None:
                images = self.device_transform(images)
            if self.pad and current.size < self.batch_size:  # one static shape: no recompilation
                images = torch.cat([images, images.new_zeros(self.batch_size - current.size, *images.shape[1:])])
            with autocast(self.device, self.precision):
                output = self.forward(images)[: current.size].float()
        except Exception as error:  # e.g. out of memory: the slides of this batch fail, the stream goes on
            if _worker_died(error):
                raise
            yield from self.fail(
                [job for job, _, _ in current.segments], f"encoding failed: {type(error).__name__}: {error}"
            )
            return
        offset = 0
        for job, start, n in current.segments:
            slide = self.pending.get(job)
            if slide is not None:
                slide.features[start : start + n] = output[offset : offset + n]  # stays on the device: no sync
                slide.done += n
            offset += n
        if self.on_tiles is not None:
            self.on_tiles(current.size)
        yield from self.complete()

    def complete(self) -> Iterator[SlideResult]:
        ready = [job for job, slide in self.pending.items() if slide.grid is not None and slide.done == slide.n_tiles]
        for job in ready:
            slide = self.pending.pop(job)
            self.finished.add(job)
            yield SlideResult(job, slide.grid, slide.features.cpu().numpy())  # one copy back per slide


def _worker_died(error: BaseException) -> bool:
    """DataLoader's error for a reader process that died; its SIGCHLD handler may raise it at any point."""
    return isinstance(error, RuntimeError) and "DataLoader worker" in str(error)


def _loader(stream: TileStream, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,  # chunks are the work items
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )


@torch.inference_mode()
def stream_features(
    jobs: Sequence[SlideJob],
    encoder: TileEncoder,
    device: torch.device,
    precision: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    chunk_size: int = CHUNK_SIZE,
    compile: bool = False,
    on_tiles: Callable[[int], object] | None = None,
    transform_on: str | None = None,
) -> Iterator[SlideResult]:
    """Encode the tiles of all `jobs` as one stream; yield each slide's result as soon as it is complete.

    A slide that cannot be read, tiled or encoded is yielded with `error` set and the stream goes on. If a
    worker process dies (e.g. a crash inside a slide library), the slides in flight are failed with that
    message and the stream restarts after them. `on_tiles(n)` is called as tiles are encoded (progress).
    `transform_on` ("device" or "workers") overrides where the tensor transform runs (default: device on CUDA).
    """
    if transform_on not in (None, "device", "workers"):
        raise UsageError(f"transform_on must be 'device' or 'workers', got {transform_on!r}")
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be >= 1, got {batch_size}")
    forward = torch.compile(encoder, dynamic=False) if compile else encoder
    chunk_size = max(1, min(chunk_size, batch_size))
    remaining = list(jobs)
    while remaining:
        state = _Encoding(encoder, forward, device, precision, batch_size, compile, on_tiles, transform_on)
        stream = TileStream(
            remaining,
            chunk_size,
            transform=None if state.device_transform or state.worker_transform else encoder.transform,
            batch_transform=state.worker_transform,
        )
        try:
            for chunk in _loader(stream, workers, device):
                yield from state.add(chunk)
            yield from state.flush()
        except RuntimeError as error:
            if not _worker_died(error):
                raise
            # Which chunk killed it is unknown: fail the slides in flight (or, with none, the next slide of the
            # stream, whose tiles were being read) and go on with a fresh stream after them.
            message = f"a tile-reading worker process died while this slide was in flight ({error}); rerun to retry"
            in_flight = [*state.pending, *(job for job, _, _ in state.batch.segments)]
            unfinished = [job.index for job in remaining if job.index not in state.failed | state.finished]
            yield from state.fail(in_flight or unfinished[:1], message)
        # the stream ended without all of a slide's tiles: never write a partial file
        yield from state.fail(list(state.pending), "the tile stream ended before all tiles of this slide were encoded")
        done = state.failed | state.finished
        if not done:
            raise RuntimeError("the tile stream made no progress")  # never loop forever
        remaining = [job for job in remaining if job.index not in done]


def embed_grid(
    slide_path: str | os.PathLike[str],
    grid: TileGrid,
    encoder: TileEncoder,
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = False,
    compile: bool = False,
    chunk_size: int = CHUNK_SIZE,
    transform_on: str | None = None,
    reader: str = "auto",
) -> np.ndarray:
    """Features [N, D] (float32) for the tiles of `grid`, in grid order (one slide through the tile stream).

    `reader` picks the pixel reader (`vlm.wsi.readers`)."""
    check_reader(reader)
    device = resolve_device(device)
    encoder = encoder.to(device).eval()
    job = SlideJob(0, Path(slide_path), grid=grid, reader=reader)
    with tqdm(
        total=len(grid), desc=slide_id_from_path(slide_path), unit="tile", disable=not progress, leave=False
    ) as bar:
        (result,) = stream_features(
            [job],
            encoder,
            device,
            precision,
            batch_size,
            workers,
            chunk_size,
            compile,
            on_tiles=bar.update,
            transform_on=transform_on,
        )
    if result.error is not None:
        raise RuntimeError(f"{slide_path}: {result.error}")
    return result.features


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
    compile: bool = False,
    chunk_size: int = CHUNK_SIZE,
    reader: str = "auto",
) -> BatchReport:
    """Embed the tiles of each slide whose `<slide_id>.h5` is not yet in `out_dir`.

    The batch rules of `vlm.batch.Batch` hold (skip finished slides, `overwrite`, shards, failures.csv);
    each `<slide_id>.h5` is written atomically as soon as its slide is complete, so a killed run resumes.
    `device` ("auto", "cpu", "cuda:1", …) and `precision` ("auto", "fp32", "fp16", "bf16") are resolved by
    `vlm.device`; an impossible pair (fp16 on CPU) is refused before any slide is read. `reader` picks the
    pixel reader (`vlm.wsi.readers`: "auto" = tifffile for pyramidal TIFF and SVS, else OpenSlide).
    """
    check_reader(reader)
    device = resolve_device(device)
    autocast_dtype(device, precision)
    if dtype not in ("float32", "float16"):
        raise UsageError(f"feature dtype must be float32 or float16, got {dtype!r}")
    out = Path(out_dir)
    make_output_folder(out)
    encoder = encoder.to(device).eval()

    def output_of(path: Path) -> Path:
        return out / f"{slide_id_from_path(path)}.h5"

    batch = Batch(
        slides,
        key=slide_id_from_path,
        is_done=lambda path: is_written(output_of(path), ("coords", "features")),
        folder=out,
        desc="embedding tiles",
        shard=shard,
        overwrite=overwrite,
        progress=progress,
    )
    grids = None if tiles_dir is None else Path(tiles_dir)
    jobs = [
        SlideJob(
            index,
            Path(path),
            grid_path=None if grids is None else grids / f"{slide_id_from_path(path)}.h5",
            params=params,
            mpp=mpp,
            reader=reader,
        )
        for index, path in enumerate(batch.pending)
    ]
    with batch:
        for result in stream_features(jobs, encoder, device, precision, batch_size, workers, chunk_size, compile):
            path = batch.pending[result.job]
            if result.error is not None:
                batch.record(path, result.error)
                continue
            features = TileFeatures(result.grid, result.features, encoder=encoder.name)
            target = output_of(path)
            with batch.attempt(path):
                check_finite_output(result.features, path, "tile encoder")
                try:
                    write_features(target, features, dtype=dtype)
                except RuntimeError as error:  # a reader died meanwhile (signalled here): not this slide's fault
                    if not _worker_died(error):
                        raise
                    write_features(target, features, dtype=dtype)
        return batch.finish()

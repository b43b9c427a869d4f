"""`vlm embed-slides`: tile features of many slides -> one slide embedding each, in one parquet file.

Output: the slide-embeddings parquet of `vlm.formats.embeddings` (one row per slide; with `n > 1` shards,
shard i writes `<stem>.shard-i-of-n.parquet` beside `out`). One run at a time writes a given file: a
second one is refused (it would overwrite the first one's rows).

Resume: slides already in the output file are skipped (unless `overwrite`); the file is rewritten
atomically every `save_every` slides, so an interrupted run keeps what it finished. A slide that fails
(unreadable file, NaN features, tiles outside the position grid …) is recorded in
`failures<shard suffix>.csv` beside the output and the batch goes on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vlm.batch import BatchReport, Shard, write_failures
from vlm.device import autocast
from vlm.encoders.slide import SLIDE_ENCODER_PRESETS, GigaPathSlideEncoder, to_gigapath_coords
from vlm.features import read_features
from vlm.formats.embeddings import (  # noqa: F401  (re-exported: the format's home is vlm.formats.embeddings)
    COLUMNS,
    SlideEmbeddings,
    load_slide_embeddings,
    read_settings_and_rows,
    read_slide_embeddings,
    shard_output,
    write_slide_embeddings,
)
from vlm.io import duplicate_ids, output_lock, slide_id_from_path

log = logging.getLogger(__name__)


def _existing_rows(path: Path, settings: dict) -> list[dict]:
    """Rows of a previous run to resume from; refuses a file made with another encoder or pool."""
    if not path.is_file():
        return []
    previous, rows = read_settings_and_rows(path)
    for key in ("encoder", "pool", "config"):
        if previous.get(key) != settings[key]:
            raise ValueError(
                f"{path} was written with {key}={previous.get(key)!r}, this run uses {settings[key]!r}; "
                "pass --overwrite to replace it or choose another --out"
            )
    return rows


def _load_slide(path: Path, encoder: GigaPathSlideEncoder, mpp: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, in_dim] float32 and 0.5-mpp coords [N, 2] of one slide, checked before batching."""
    slide_id = slide_id_from_path(path)
    tile_features = read_features(path, mpp=mpp)
    features = np.asarray(tile_features.features, dtype=np.float32)
    if len(features) == 0:
        raise ValueError(f"slide {slide_id!r}: {path} has no tiles; re-run `vlm tile` / `vlm embed-tiles`")
    if features.shape[1] != encoder.config.in_dim:
        raise ValueError(
            f"slide {slide_id!r}: features are {features.shape[1]}-d (from {tile_features.encoder!r}) "
            f"but the slide encoder expects {encoder.config.in_dim}-d tile features"
        )
    if not np.isfinite(features).all():
        raise ValueError(f"slide {slide_id!r}: {path} has NaN/inf features; re-extract them")
    config, grid = encoder.config, tile_features.grid
    coords = to_gigapath_coords(
        grid.coords, grid.mpp, slide_id, config.tile_size, config.grid_size, grid.tile_size_level0
    )
    return features, coords


@torch.inference_mode()
def _embed_batch(
    slides: list[tuple[np.ndarray, np.ndarray]],
    encoder: GigaPathSlideEncoder,
    pool: str,
    device: torch.device,
    precision: str,
) -> np.ndarray:
    """Right-pad a list of slides into one batch; returns [len(slides), dim] float32."""
    length = max(len(features) for features, _ in slides)
    features = torch.zeros(len(slides), length, encoder.config.in_dim)
    coords = torch.zeros(len(slides), length, 2, dtype=torch.float64)
    mask = torch.ones(len(slides), length, dtype=torch.bool)
    for row, (slide_features, slide_coords) in enumerate(slides):
        n = len(slide_features)
        features[row, :n] = torch.from_numpy(slide_features)
        coords[row, :n] = torch.from_numpy(slide_coords)
        mask[row, :n] = False
    with autocast(device, precision):
        output = encoder(features.to(device), coords.to(device), padding_mask=mask.to(device), pool=pool)
    return output.float().cpu().numpy()


def embed_slides(
    feature_paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    encoder: GigaPathSlideEncoder,
    pool: str = "mean",
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    shard: Shard = Shard(),
    progress: bool = True,
    overwrite: bool = False,
    mpp: float | None = None,
    precision: str = "auto",
    checkpoint: str | None = None,
    save_every: int = 50,
) -> BatchReport:
    """Embed each feature file's slide and write the rows to `out` (or this shard's file).

    `batch_size` slides are padded into one forward pass (each gets the numbers it gets alone); on GPU
    this helps for many small slides, on CPU 1 is as fast. `mpp` overrides the files' level-0 µm/px.
    `checkpoint` is only recorded in the file's metadata.
    """
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    encoder.pooled_dim(pool)  # validates pool before any work
    name = next((key for key, config in SLIDE_ENCODER_PRESETS.items() if config == encoder.config), "custom")
    settings = {"encoder": name, "pool": pool, "config": asdict(encoder.config), "checkpoint": checkpoint}
    settings["config"] = json.loads(json.dumps(settings["config"]))  # tuples -> lists, as read back
    target = shard_output(out, shard)
    with output_lock(target):  # a second run writing the same file is refused: it would drop this run's rows
        return _embed_into(target, feature_paths, encoder, pool, device, batch_size, shard, progress, overwrite,
                           mpp, precision, settings, name, save_every)  # fmt: skip


def _embed_into(
    target: Path,
    feature_paths: Sequence[str | os.PathLike[str]],
    encoder: GigaPathSlideEncoder,
    pool: str,
    device: torch.device,
    batch_size: int,
    shard: Shard,
    progress: bool,
    overwrite: bool,
    mpp: float | None,
    precision: str,
    settings: dict,
    name: str,
    save_every: int,
) -> BatchReport:
    rows = [] if overwrite else _existing_rows(target, settings)
    done_ids = {row["slide_id"] for row in rows}
    report = BatchReport()
    mine = shard.select([Path(path) for path in feature_paths], key=slide_id_from_path)
    ids = [slide_id_from_path(path) for path in mine]
    duplicates = duplicate_ids(ids)
    if duplicates:
        raise ValueError(f"several feature files share the slide id(s) {duplicates}; rename them")
    pending: list[tuple[str, np.ndarray, np.ndarray]] = []
    unsaved = 0

    def flush() -> None:
        nonlocal unsaved
        if not pending:
            return
        try:
            embeddings = _embed_batch([(f, c) for _, f, c in pending], encoder, pool, device, precision)
        except (RuntimeError, ValueError) as error:  # e.g. out of memory: retry alone to isolate the slide
            if len(pending) == 1:
                report.failed.append((pending[0][0], f"{type(error).__name__}: {error}"))
                log.error("%s failed: %s", pending[0][0], error)
                pending.clear()
                return
            batch = list(pending)
            pending.clear()
            for item in batch:
                pending.append(item)
                flush()
            return
        for (slide_id, features, _), embedding in zip(pending, embeddings, strict=True):
            rows.append({"slide_id": slide_id, "embedding": embedding.tolist(), "n_tiles": len(features),
                         "encoder": name, "pool": pool})  # fmt: skip
            report.done.append(slide_id)
            unsaved += 1
        pending.clear()
        if unsaved >= save_every:
            write_slide_embeddings(target, rows, settings)
            unsaved = 0

    for path in tqdm(mine, desc="embed-slides", unit="slide", disable=not progress):
        slide_id = slide_id_from_path(path)
        if slide_id in done_ids:
            report.skipped.append(slide_id)
            continue
        try:
            pending.append((slide_id, *_load_slide(path, encoder, mpp)))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # one bad file must not stop a batch of thousands
            log.error("%s failed: %s", slide_id, error)
            report.failed.append((slide_id, f"{type(error).__name__}: {error}"))
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
    if report.done or not target.exists():
        write_slide_embeddings(target, rows, settings)
    write_failures(target.parent / f"failures{shard.suffix}.csv", report.failed)
    log.info("embed-slides: %s -> %s", report.summary(), target)
    return report

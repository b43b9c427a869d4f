"""`vlm embed-slides`: tile features of many slides -> one slide embedding each, in one parquet file.

Output `slides.parquet`: one row per slide with columns `slide_id`, `embedding` (list of float32; for
`pool="all-layers"` the 13 vectors `h_0 … h_12` concatenated in that order), `n_tiles`, `encoder`, `pool`.
The run's settings (encoder config, pool, checkpoint) are stored as JSON under the parquet metadata key
`vlm`. With `n > 1` shards (`--shard i/n` or torchrun), shard i writes `<stem>.shard-i-of-n.parquet`
beside `out`; `read_slide_embeddings(out)` reads either the single file or all shard files.

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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from vlm.batch import BatchReport, Shard, write_failures
from vlm.device import autocast
from vlm.encoders.slide import SLIDE_ENCODER_PRESETS, GigaPathSlideEncoder, to_gigapath_coords
from vlm.features import read_features
from vlm.io import atomic_path, duplicate_ids, slide_id_from_path

log = logging.getLogger(__name__)

COLUMNS = ("slide_id", "embedding", "n_tiles", "encoder", "pool")


def shard_output(out: str | os.PathLike[str], shard: Shard) -> Path:
    """The file shard `shard` writes: `out` itself, or `<stem>.shard-i-of-n<suffix>` beside it."""
    out = Path(out)
    return out if shard.count == 1 else out.with_name(f"{out.stem}{shard.suffix}{out.suffix}")


def read_slide_embeddings(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Slide embeddings as a DataFrame (`embedding` holds 1-D float32 arrays), from one file or its shards.

    `np.stack(df["embedding"])` gives the [n_slides, dim] matrix.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}"))
    if not files:
        raise FileNotFoundError(f"{path}: no slide-embedding parquet (nor shard files beside it)")
    frame = pd.concat([pq.read_table(file).to_pandas() for file in files], ignore_index=True)
    frame["embedding"] = [np.asarray(value, dtype=np.float32) for value in frame["embedding"]]
    return frame


@dataclass
class SlideEmbeddings:
    """Validated, unprojected slide embeddings (`vlm embed-slides` output), looked up by slide id."""

    ids: list[str]
    embeddings: torch.Tensor  # [N, D] float32
    encoder: str = "unknown"
    pool: str = "unknown"

    def __post_init__(self) -> None:
        self.row = {slide_id: i for i, slide_id in enumerate(self.ids)}

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def lookup(self, slide_ids: list[str]) -> torch.Tensor:  # [len(slide_ids), D]
        return self.embeddings[[self.row[s] for s in slide_ids]]


def load_slide_embeddings(path: str | os.PathLike[str]) -> SlideEmbeddings:
    """`read_slide_embeddings` (one file or its shards) plus the checks every consumer needs.

    Refused, with the fix in the message: missing columns, an empty table, a slide id twice, embeddings of
    different widths, and a mix of encoders or poolings (vectors from different spaces are not comparable).
    """
    frame = read_slide_embeddings(path)
    missing = [c for c in ("slide_id", "embedding") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(frame.columns)} "
                         "(expected the output of `vlm embed-slides`)")
    if len(frame) == 0:
        raise ValueError(f"{path}: no slide embeddings in the file; run `vlm embed-slides` first")
    ids = [str(s) for s in frame["slide_id"]]
    duplicates = duplicate_ids(ids)
    if duplicates:
        raise ValueError(f"{path}: slide ids {duplicates[:5]} appear more than once; keep one embedding per slide")
    widths = sorted({len(e) for e in frame["embedding"]})
    if len(widths) > 1:
        raise ValueError(f"{path}: embeddings have different widths {widths}; re-run `vlm embed-slides`")
    provenance = {}
    for column in ("encoder", "pool"):
        values = sorted({str(v) for v in frame[column]}) if column in frame.columns else ["unknown"]
        if len(values) > 1:
            raise ValueError(f"{path}: mixed {column} values {values}; use one kind of slide embedding at a time")
        provenance[column] = values[0]
    return SlideEmbeddings(ids, torch.from_numpy(np.stack(frame["embedding"])), **provenance)


def _write_parquet(path: Path, rows: list[dict], settings: dict) -> None:
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [("slide_id", pa.string()), ("embedding", pa.list_(pa.float32())), ("n_tiles", pa.int64()),
             ("encoder", pa.string()), ("pool", pa.string())],
            metadata={"vlm": json.dumps(settings)},
        ),
    )  # fmt: skip
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _existing_rows(path: Path, settings: dict) -> list[dict]:
    """Rows of a previous run to resume from; refuses a file made with another encoder or pool."""
    if not path.is_file():
        return []
    table = pq.read_table(path)
    previous = json.loads((table.schema.metadata or {}).get(b"vlm", b"{}"))
    for key in ("encoder", "pool", "config"):
        if previous.get(key) != settings[key]:
            raise ValueError(
                f"{path} was written with {key}={previous.get(key)!r}, this run uses {settings[key]!r}; "
                "pass --overwrite to replace it or choose another --out"
            )
    return table.to_pylist()


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


def _tile_count(path: Path) -> float:
    """Tiles in a feature file, from the dataset's shape alone (unreadable files sort last and fail on load)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return float(h5["features"].shape[0])
    except (OSError, KeyError, IndexError, TypeError):
        return float("inf")


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

    `batch_size` slides are padded into one forward pass (each gets the numbers it gets alone); slides are
    then taken in order of tile count, so each batch holds slides of similar length and pads little. On GPU
    this helps for many small slides, on CPU 1 is as fast. Rows are written in slide-id order either way.
    `mpp` overrides the files' level-0 µm/px.
    `checkpoint` is only recorded in the file's metadata.
    """
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    encoder.pooled_dim(pool)  # validates pool before any work
    name = next((key for key, config in SLIDE_ENCODER_PRESETS.items() if config == encoder.config), "custom")
    settings = {"encoder": name, "pool": pool, "config": asdict(encoder.config), "checkpoint": checkpoint}
    settings["config"] = json.loads(json.dumps(settings["config"]))  # tuples -> lists, as read back
    target = shard_output(out, shard)
    rows = [] if overwrite else _existing_rows(target, settings)
    done_ids = {row["slide_id"] for row in rows}
    report = BatchReport()
    mine = shard.select([Path(path) for path in feature_paths], key=slide_id_from_path)
    ids = [slide_id_from_path(path) for path in mine]
    duplicates = duplicate_ids(ids)
    if duplicates:
        raise ValueError(f"several feature files share the slide id(s) {duplicates}; rename them")
    if batch_size > 1:  # length buckets: slides batched with slides of similar length pad little
        mine = sorted(mine, key=_tile_count)
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
            _write_parquet(target, sorted(rows, key=lambda row: row["slide_id"]), settings)
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
        _write_parquet(target, sorted(rows, key=lambda row: row["slide_id"]), settings)
    write_failures(target.parent / f"failures{shard.suffix}.csv", report.failed)
    log.info("embed-slides: %s -> %s", report.summary(), target)
    return report

"""`vlm embed-slides`: tile features of many slides -> one slide embedding each, in one parquet file.

Output: the slide-embeddings parquet of `vlm.formats.embeddings` (one row per slide; with `n > 1` shards,
shard i writes `<stem>.shard-i-of-n.parquet` beside `out`). The run's settings (encoder preset and config,
pool, checkpoint path and sha256, sha256 of the encoder's weights) are stored with the rows; `vlm train`
copies them into a frozen-tower model so that its slide encoder can be rebuilt (tile heatmaps). One run at
a time writes a given file: a second one is refused (it would overwrite the first one's rows).

Resume: slides already in the output file are skipped (unless `overwrite`); the file is rewritten
atomically every `save_every` slides, so an interrupted run keeps what it finished. A slide that fails
(unreadable file, NaN features, tiles outside the position grid …) is recorded in
`failures<shard suffix>.csv` beside the output and the batch goes on.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm.batch import Batch, BatchReport, Shard, check_finite_output
from vlm.device import autocast, autocast_dtype, resolve_device
from vlm.encoders.slide import SLIDE_ENCODER_PRESETS, GigaPathSlideEncoder
from vlm.encoders.slide_inputs import SlideInputs, check_tile_encoders, load_slide_inputs, pad_batch
from vlm.errors import InputError
from vlm.formats.embeddings import read_settings_and_rows, shard_output, write_slide_embeddings
from vlm.formats.features import MPP_FROM_FILE, feature_shape
from vlm.io import file_sha256, output_lock, slide_id_from_path
from vlm.weights import weights_digest

log = logging.getLogger(__name__)


def _one_writer(function: Callable[..., BatchReport]) -> Callable[..., BatchReport]:
    """Hold the output file's lock during the run: a second run writing the same file is refused
    (`BlockingIOError`), as it would rewrite the file without the first one's rows."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def locked(*args: Any, **kwargs: Any) -> BatchReport:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with output_lock(shard_output(bound.arguments["out"], bound.arguments["shard"])):
            return function(*args, **kwargs)

    return locked


def _existing_rows(path: Path, settings: dict) -> list[dict]:
    """Rows of a previous run to resume from; refuses a file made with another encoder or pool."""
    if not path.is_file():
        return []
    try:
        previous, rows = read_settings_and_rows(path)
    except ValueError as error:  # the reader's own advice ("re-run embed-slides") is this very command
        raise InputError(f"{path}: the output to resume is damaged ({error.__cause__ or error}); pass `overwrite` "
                         "to recompute every slide, or choose another `out`") from error
    for key in ("encoder", "pool", "config", "weights_sha256", "tile_encoder"):
        if key == "tile_encoder" and None in (previous.get(key), settings[key]):
            continue  # an output of a vlm that did not record it, or files that record none
        if previous.get(key) != settings[key]:
            raise InputError(
                f"{path} was written with {key}={previous.get(key)!r}, this run uses {settings[key]!r}; "
                "pass `overwrite` to replace it or choose another `out`"
            )
    return rows


@dataclass
class _Rows:
    """The output file's rows as a `vlm.batch.Sink`: a previous run's plus this run's, all rewritten on save."""

    path: Path
    settings: dict
    rows: list[dict]

    def add(self, slide_id: str, row: dict) -> None:
        self.rows.append(row)

    def save(self) -> None:
        write_slide_embeddings(self.path, sorted(self.rows, key=lambda row: row["slide_id"]), self.settings)


def _tile_count(path: Path) -> float:
    """Tiles in a feature file, from the dataset's shape alone (unreadable files sort last and fail on load)."""
    try:
        return float(feature_shape(path)[0])
    except (ValueError, IndexError):
        return float("inf")


@torch.inference_mode()
def _embed_batch(
    slides: list[SlideInputs],
    encoder: GigaPathSlideEncoder,
    pool: str,
    device: torch.device,
    precision: str,
) -> np.ndarray:
    """Right-pad a list of slides into one batch; returns [len(slides), dim] float32."""
    features, coords, mask = pad_batch(slides)
    with autocast(device, precision):
        output = encoder(features.to(device), coords.to(device), padding_mask=mask.to(device), pool=pool)
    return output.float().cpu().numpy()


@_one_writer
def embed_slides(
    feature_paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    encoder: GigaPathSlideEncoder,
    pool: str = "mean",
    device: str | torch.device = "auto",
    batch_size: int = 1,
    shard: Shard = Shard(),
    progress: bool = True,
    overwrite: bool = False,
    mpp: float | None = None,
    patches: str | os.PathLike[str] | None = None,
    precision: str = "auto",
    checkpoint: str | None = None,
    save_every: int = 50,
    compile: bool = False,
) -> BatchReport:
    """Embed each feature file's slide and write the rows to `out` (or this shard's file).

    `batch_size` slides are padded into one forward pass (each gets the numbers it gets alone); slides are
    then taken in order of tile count, so each batch holds slides of similar length and pads little. On GPU
    this helps for many small slides, on CPU 1 is as fast. Rows are written in slide-id order either way.
    `mpp` overrides the files' level-0 µm/px; `patches` is CLAM's patches folder (see
    `vlm.formats.features.read_tile_grid`). Every slide goes through
    `vlm.encoders.slide_inputs.load_slide_inputs`, as in
    training and zero-shot. `checkpoint` is only recorded in the file's metadata (path and sha256), with a
    hash of the encoder's weights, so that a model trained on these embeddings knows which encoder made them.
    `device` and `precision` are names ("auto", "cuda:1", "bf16", …) resolved by `vlm.device`; an impossible
    pair (fp16 on CPU) is refused before any work. `compile` runs the encoder's token-wise layers through
    `torch.compile` (`LongNetEncoder.compile_token_wise`; the first slides pay a compile of seconds to a
    minute, then each layer launches a few fused kernels instead of a dozen); it stays set on `encoder`.
    """
    device = resolve_device(device)
    autocast_dtype(device, precision)
    encoder = encoder.to(device).eval()
    if compile:
        encoder.encoder.compile_token_wise()
    encoder.pooled_dim(pool)  # validates pool before any work
    name = next((key for key, config in SLIDE_ENCODER_PRESETS.items() if config == encoder.config), "custom")
    tile_encoder = check_tile_encoders(feature_paths, name)  # one tile encoder, the one `name` was trained on
    settings = {"encoder": name, "pool": pool, "config": asdict(encoder.config), "checkpoint": checkpoint,
                "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
                "weights_sha256": weights_digest(encoder), "tile_encoder": tile_encoder}
    settings["config"] = json.loads(json.dumps(settings["config"]))  # tuples -> lists, as read back
    target = shard_output(out, shard)
    rows = _Rows(target, settings, [] if overwrite else _existing_rows(target, settings))
    done_ids = {row["slide_id"] for row in rows.rows}
    config = encoder.config

    def load(path: Path) -> SlideInputs:
        slide = load_slide_inputs(path, config.in_dim, mpp, patches, config.tile_size, config.grid_size)
        if slide.provenance["mpp_source"] != MPP_FROM_FILE:  # say where else the scale came from
            log.info("%s: level-0 %.4g µm/px from %s", slide.slide_id, slide.provenance["mpp"],
                     slide.provenance["mpp_source"])
        return slide

    def embed(slides: list[SlideInputs]) -> list[dict]:
        embeddings = _embed_batch(slides, encoder, pool, device, precision)
        for slide, vector in zip(slides, embeddings, strict=True):  # a chunk that raises is retried slide by slide
            check_finite_output(vector[None], slide.provenance.get("source", slide.slide_id), "slide encoder")
        return [
            {
                "slide_id": slide.slide_id,
                "embedding": vector.tolist(),
                "n_tiles": len(slide),
                "encoder": name,
                "pool": pool,
            }
            for slide, vector in zip(slides, embeddings, strict=True)
        ]

    batch = Batch(
        [Path(path) for path in feature_paths],
        key=slide_id_from_path,
        is_done=lambda path: slide_id_from_path(path) in done_ids,
        folder=target.parent,
        desc="embed-slides",
        shard=shard,
        overwrite=overwrite,
        progress=progress,
        order=_tile_count if batch_size > 1 else None,  # length buckets: slides of similar length pad little
    )
    report = batch.run_chunked(load, embed, rows, chunk_size=batch_size, save_every=save_every)
    if not target.exists():  # nothing new and no earlier file: an empty table, so the output always exists
        rows.save()
    return report


def embed_with_model(
    features: str | os.PathLike[str],
    model: Any,
    out: str | os.PathLike[str],
    device: str | torch.device = "auto",
    precision: str = "auto",
    progress: bool = True,
    mpp: float | None = None,
    patches: str | os.PathLike[str] | None = None,
) -> BatchReport:
    """A folder of tile features embedded with a trained `SlideTextModel`'s own slide encoder and pool into `out`.

    How `vlm zeroshot --features` scores tile features: the embeddings are the ones the model was trained on.
    A model trained on cached embeddings has no slide encoder; the error says what to run instead.
    """
    from vlm.formats.features import feature_files

    if model.slide_encoder is None:
        raise InputError(
            f"`features` {features}: this model has no slide encoder (it was trained on cached slide embeddings). "
            f"Embed the slides with the slide encoder the model was trained on, `vlm embed-slides {features} --out "
            "slides.parquet`, then pass `embeddings` slides.parquet"
        )
    log.info("embedding %s with the model's slide encoder into %s", features, out)
    return embed_slides(feature_files(features), out, model.slide_encoder, pool=model.config.pool, device=device,
                        precision=precision, progress=progress, mpp=mpp, patches=patches)

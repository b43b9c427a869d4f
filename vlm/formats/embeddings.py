"""The slide-embeddings parquet (`vlm embed-slides` output): read, write, shards and validation.

One row per slide: `slide_id` (text), `embedding` (list of float32; for `pool="all-layers"` the 13 vectors
`h_0 … h_12` concatenated in that order), `n_tiles`, `encoder`, `pool`. The run's settings (encoder config,
pool, checkpoint) are JSON under the parquet metadata key `vlm`. A run split in n > 1 shards writes
`<stem>.shard-i-of-n<suffix>` beside the named file; readers take the file or, if it is absent, its shards.

Every consumer (training, zero-shot, retrieval) loads through `load_slide_embeddings`, which refuses what
would give a silent wrong answer: a slide twice, mixed widths, encoders or poolings; and `check_finite`
refuses the slides whose embedding holds NaN or infinite values, by id (a NaN row would otherwise be
indexed, trained on or scored like any other). Unused broken rows do not block the others. Pages carry CRC
checksums, so a flipped byte inside the file is refused on read instead of read as a wrong number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vlm.errors import InputError, MissingInputError, UsageError
from vlm.io import atomic_path, duplicate_ids

if TYPE_CHECKING:
    import torch

    from vlm.batch import Shard

COLUMNS: tuple[str, ...] = ("slide_id", "embedding", "n_tiles", "encoder", "pool")
SETTINGS_KEY = b"vlm"
SCHEMA = pa.schema([("slide_id", pa.string()), ("embedding", pa.list_(pa.float32())), ("n_tiles", pa.int64()),
                    ("encoder", pa.string()), ("pool", pa.string())])


def shard_output(out: str | os.PathLike[str], shard: Shard) -> Path:
    """The file shard `shard` writes: `out` itself, or `<stem>.shard-i-of-n<suffix>` beside it."""
    out = Path(out)
    return out if shard.count == 1 else out.with_name(f"{out.stem}{shard.suffix}{out.suffix}")


def shard_files(path: str | os.PathLike[str]) -> list[Path]:
    """The file itself when it exists, else the shard files beside it (sorted); [] when there are none."""
    path = Path(path)
    return [path] if path.is_file() else sorted(path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}"))


def write_slide_embeddings(path: str | os.PathLike[str], rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """Write rows (dicts with the `COLUMNS`) and the run's settings, atomically."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata({SETTINGS_KEY: json.dumps(settings)}))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)  # so a flipped byte is refused, not read as a number


def read_settings_and_rows(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The settings and rows of one file (what a resumed run continues from)."""
    table = _read_file(Path(path))
    return json.loads((table.schema.metadata or {}).get(SETTINGS_KEY, b"{}")), table.to_pylist()


def read_embedding_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The run settings stored with slide embeddings (encoder preset, config, pool, checkpoint, weights hash).

    Shard files must agree; a file written before settings were recorded gives `{}`.
    """
    files = shard_files(path)
    if not files:
        raise MissingInputError(f"{path}: no slide-embedding parquet (nor shard files beside it)")
    found = [json.loads((pq.read_schema(file).metadata or {}).get(SETTINGS_KEY, b"{}")) for file in files]
    if any(settings != found[0] for settings in found[1:]):
        raise InputError(f"{path}: its shard files were written with different slide-encoder settings")
    return found[0]


def read_slide_embeddings(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Slide embeddings as a DataFrame (`embedding` holds 1-D float32 arrays), from one file or its shards.

    `np.stack(df["embedding"])` gives the [n_slides, dim] matrix. No checks: see `load_slide_embeddings`.
    """
    files = shard_files(path)
    if not files:
        raise MissingInputError(f"{path}: no slide-embedding parquet (nor shard files beside it)")
    frame = pd.concat([_read_file(file).to_pandas() for file in files], ignore_index=True)
    if "embedding" in frame.columns:
        frame["embedding"] = [np.asarray(value, dtype=np.float32) for value in frame["embedding"]]
    return frame


def _read_file(file: Path) -> pa.Table:
    try:
        return pq.read_table(file, page_checksum_verification=True)  # files written without checksums still read
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{file}: not a readable parquet file ({error}); re-run `vlm embed-slides`") from error


@dataclass
class SlideEmbeddings:
    """Validated, unprojected slide embeddings (`vlm embed-slides` output), looked up by slide id."""

    ids: list[str]
    embeddings: torch.Tensor  # [N, D] float32
    encoder: str = "unknown"
    pool: str = "unknown"
    source: str = "slide embeddings"  # the file, for error messages
    non_finite: frozenset[str] = frozenset()  # ids whose embedding holds NaN or inf

    def __post_init__(self) -> None:
        self.row = {slide_id: i for i, slide_id in enumerate(self.ids)}

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def lookup(self, slide_ids: list[str]) -> torch.Tensor:  # [len(slide_ids), D]
        """The embeddings of `slide_ids`, in that order (call `check_finite` on the ids a result uses)."""
        return self.embeddings[[self.row[s] for s in slide_ids]]

    def check_finite(self, slide_ids: list[str] | None = None) -> None:
        """Refuse, naming them, the slides (of `slide_ids`, default all) whose embedding is NaN or infinite."""
        broken = sorted(self.non_finite if slide_ids is None else self.non_finite.intersection(slide_ids))
        if broken:
            raise UsageError(
                f"{self.source}: {len(broken)} slide(s) have NaN or infinite embedding values, e.g. {broken[:10]}; "
                "re-embed them (`vlm embed-slides --overwrite`) or leave them out"
            )


def load_slide_embeddings(path: str | os.PathLike[str]) -> SlideEmbeddings:
    """`read_slide_embeddings` (one file or its shards) plus the checks every consumer needs.

    Refused, with the fix in the message: missing columns, an empty table, a slide id twice, embeddings of
    different widths, and a mix of encoders or poolings (vectors from different spaces are not comparable).
    Rows with non-finite values are recorded (`non_finite`) and refused where used (`check_finite`).
    """
    import torch

    frame = read_slide_embeddings(path)
    missing = [c for c in ("slide_id", "embedding") if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; found {list(frame.columns)} "
                         "(expected the output of `vlm embed-slides`)")
    if len(frame) == 0:
        raise InputError(f"{path}: no slide embeddings in the file; run `vlm embed-slides` first")
    ids = [str(s) for s in frame["slide_id"]]
    duplicates = duplicate_ids(ids)
    if duplicates:
        raise InputError(f"{path}: slide ids {duplicates[:5]} appear more than once; keep one embedding per slide")
    widths = sorted({len(e) for e in frame["embedding"]})
    if len(widths) > 1:
        raise InputError(f"{path}: embeddings have different widths {widths}; re-run `vlm embed-slides`")
    matrix = np.stack(frame["embedding"])
    bad = frozenset(ids[i] for i in np.flatnonzero(~np.isfinite(matrix).all(axis=1)))
    provenance = {}
    for column in ("encoder", "pool"):
        values = sorted({str(v) for v in frame[column]}) if column in frame.columns else ["unknown"]
        if len(values) > 1:
            raise InputError(f"{path}: mixed {column} values {values}; use one kind of slide embedding at a time")
        provenance[column] = values[0]
    return SlideEmbeddings(ids, torch.from_numpy(matrix), **provenance, source=str(path), non_finite=bad)

"""`SlideIndex`: a FAISS index of projected, L2-normalised slide embeddings, saved as a folder.

```
runs/index/
  index.faiss       FAISS IndexIDMap2 over the kind's index; ids are stable row ids (never reused)
  metadata.parquet  faiss_id, slide_id and the user's metadata columns, one row per indexed slide
  manifest.json     format, model config digest and folder, kind, params, dim, count, measured recall, version,
                    and the SHA-256 of index.faiss and metadata.parquet (checked on every load)
```
The folder is written with `vlm.io.atomic_dir` (crash-safe, under the folder's lock), so a reader sees the
old or the new index, never a mix; damaged or mixed files are refused with the file named.
Slide embeddings are stored unprojected (`vlm embed-slides`); the index holds them projected by one model.
The manifest names that model by its config digest and a hash of its projection heads, and an index refuses
a model that differs in either: its vectors would live in another space and every score would be meaningless.

Removal: `flat` deletes vectors; the approximate kinds cannot renumber their lists or graph, so removed
ids stay in `index.faiss` as tombstones (ids without a metadata row) and are filtered out of every search.
Rebuild when many are removed (a warning says when).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from vlm import __version__
from vlm.errors import InputError, MissingInputError, UsageError
from vlm.io import INTERNAL_PREFIX, atomic_dir, duplicate_ids, file_sha256, foreign_folder_error, recover_dir
from vlm.model.clip import SlideTextModel
from vlm.retrieval import kinds
from vlm.weights import update_state_digest

log = logging.getLogger(__name__)

FORMAT = "vlm-index"
FORMAT_VERSION = 2  # 2: manifest["files"] holds the SHA-256 of each data file
INDEX_FILE, METADATA_FILE, MANIFEST_FILE = "index.faiss", "metadata.parquet", "manifest.json"
ID_COLUMN = "faiss_id"
RESULT_COLUMNS = ("query", "rank", "score")
TOMBSTONE_WARNING = 0.25  # share of removed-but-stored vectors above which a rebuild is suggested

T = TypeVar("T", bound="SlideIndex")
ModelArg = SlideTextModel | str | os.PathLike[str]


def resolve_model(model: ModelArg) -> tuple[SlideTextModel, str | None]:
    """A model object, plus its folder when it was given as a path (recorded so search can reload it)."""
    if isinstance(model, SlideTextModel):
        return model, None
    return SlideTextModel.from_pretrained(model), str(Path(model).resolve())


@torch.no_grad()
def project_slides(model: SlideTextModel, embeddings: np.ndarray | torch.Tensor, batch: int = 4096) -> np.ndarray:
    """Unprojected slide embeddings [N, E] -> joint-space vectors [N, D], float32, L2-normalised."""
    tensor = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    chunks = [model.encode_slide_embeddings(tensor[i : i + batch]).cpu() for i in range(0, len(tensor), batch)]
    return np.ascontiguousarray(torch.cat(chunks).numpy()) if chunks else np.zeros((0, model.config.proj_dim), "f4")


def model_fingerprint(model: SlideTextModel) -> dict[str, str]:
    """The architecture digest, and a hash of the projection heads: two trainings of one architecture
    share the digest but not the projections, and an index must not mix their spaces."""
    projections = update_state_digest(hashlib.sha256(), model, ("slide_proj.", "text_proj."))
    return {"digest": model.config.digest(), "projections": projections.hexdigest()}


class SlideIndex:
    """Slides searchable by report text (`search_text`) and by another indexed slide (`search_slide`).

    Build with `SlideIndex.build(model, embeddings, slide_ids)`, then `save(folder)`; `SlideIndex.load(folder)`
    reads it back. Text queries need the model, loaded lazily from the folder the manifest names unless one
    is passed; slide-id queries read the stored vector back and need no model.
    """

    content: ClassVar[str] = "slides"
    key: ClassVar[str] = "slide_id"

    def __init__(
        self,
        index: faiss.Index,
        metadata: pd.DataFrame,
        manifest: dict[str, Any],
        model: SlideTextModel | None = None,
        gpu: bool = False,
    ) -> None:
        self.index = index
        self.metadata = metadata.reset_index(drop=True)
        self.manifest = manifest
        self._model: SlideTextModel | None = None
        if model is not None:
            self.model = model
        self._gpu = gpu
        kinds.apply_params(index, self.kind, self.params)
        self._refresh()

    # --- properties -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.metadata)

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.manifest["params"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def keys(self) -> list[str]:
        """The indexed slide ids (report ids for a `ReportIndex`), in metadata order."""
        return self.metadata[self.key].tolist()

    @property
    def model(self) -> SlideTextModel:
        """The model the index was built with; loaded from the manifest's model folder on first use."""
        if self._model is None:
            folder = self.manifest["model"].get("path")
            if not folder:
                raise InputError("this index does not record its model's folder; pass the model (`model`)")
            if not Path(folder).is_dir():
                raise MissingInputError(
                    f"{folder}: the model this index was built with is gone; pass its new location with `model`"
                )
            model = SlideTextModel.from_pretrained(folder)
            self.model = model
            return model
        return self._model

    @model.setter
    def model(self, model: SlideTextModel) -> None:
        recorded = self.manifest["model"]
        for name, value in model_fingerprint(model).items():
            if name in recorded and value != recorded[name]:  # early indexes recorded the digest only
                what = "config digest" if name == "digest" else "projection weights"
                raise InputError(
                    f"the model's {what} ({value[:12]}…) differ from those of the model this index was built "
                    f"with ({recorded[name][:12]}…, folder {recorded.get('path')}): its vectors live in another "
                    "space. Search with that model, or rebuild the index with `vlm index build`"
                )
        self._model = model

    # --- building ---------------------------------------------------------------------------------
    @classmethod
    def build(
        cls: type[T],
        model: ModelArg,
        embeddings: np.ndarray | torch.Tensor,
        slide_ids: Sequence[str],
        metadata: pd.DataFrame | None = None,
        **options: Any,
    ) -> T:
        """Project unprojected slide embeddings [N, E] with `model` and index them (see `from_vectors`)."""
        model, folder = resolve_model(model)
        return cls.from_vectors(project_slides(model, embeddings), slide_ids, model, metadata,
                                model_path=folder, **options)

    @classmethod
    def from_vectors(
        cls: type[T],
        vectors: np.ndarray,
        keys: Sequence[str],
        model: SlideTextModel,
        metadata: pd.DataFrame | None = None,
        *,
        model_path: str | None = None,
        kind: str = "auto",
        target_recall: float = 0.95,
        recall_k: int = 10,
        seed: int = 0,
        gpu: bool = False,
        source: dict[str, Any] | None = None,
    ) -> T:
        """Index joint-space `vectors` [N, D] (L2-normalised) under `keys`; tune approximate kinds.

        `metadata` holds the key column plus any user columns (rows for other keys are ignored).
        """
        keys = [str(k) for k in keys]
        vectors = _check_vectors(vectors, len(keys), model.config.proj_dim)
        _check_new_keys(keys, set(), cls.key)
        chosen, params = _choose(kind, len(keys), vectors.shape[1], cls.content)
        index = kinds.create_index(chosen, vectors.shape[1], params)
        kinds.train_index(index, chosen, vectors, seed=seed)
        ids = np.arange(len(keys), dtype=np.int64)
        index.add_with_ids(vectors, ids)
        params, recall = kinds.tune(index, chosen, params, vectors, ids, target=target_recall, k=recall_k, seed=seed)
        return cls._assemble(index, chosen, kind, params, recall, keys, metadata, model, model_path, source, gpu)

    @classmethod
    def from_vector_chunks(
        cls: type[T],
        chunks: Callable[[], Iterable[tuple[np.ndarray, Sequence[str]]]],
        model: SlideTextModel,
        metadata: pd.DataFrame | None = None,
        *,
        model_path: str | None = None,
        kind: str = "auto",
        target_recall: float = 0.95,
        recall_k: int = 10,
        seed: int = 0,
        gpu: bool = False,
        source: dict[str, Any] | None = None,
        sample_size: int = kinds.TRAIN_SAMPLE,
    ) -> T:
        """Index a collection too large to hold in memory (10M x 512 float32 is 20 GB), in two passes.

        `chunks()` returns a fresh iterable of (vectors [b, D], keys) blocks, the same blocks each call.
        Pass 1 checks every block and keeps a uniform random sample of `sample_size` rows, to train on;
        its first `TUNE_QUERIES` rows are the tuning queries. Pass 2 adds each block and scans it for those
        queries' exact neighbours (brute-force top-k, merged block by block), so that besides the index only
        one block and the sample are ever held. A block that differs between the passes is refused.
        The result equals `from_vectors` on the concatenated blocks up to the training sample.
        """
        kinds.check_target(target_recall)
        dim = model.config.proj_dim
        rng = np.random.default_rng(seed)
        key_blocks: list[pa.Array] = []  # Arrow strings: 10M keys take ~0.2 GB, as Python strings ~0.7 GB
        digests: list[bytes] = []
        sample = np.zeros((0, dim), np.float32)
        sample_keys = np.zeros(0)  # uniform draws; the rows with the smallest ones are a uniform sample
        sample_ids = np.zeros(0, np.int64)
        started, seen = time.perf_counter(), 0
        for block, _ in _blocks(chunks(), dim, key_blocks, digests, first_pass=True):
            draws = rng.random(len(block))
            limit = np.sort(sample_keys)[sample_size - 1] if len(sample_keys) >= sample_size else 1.0
            enter = np.flatnonzero(draws < limit)
            if len(enter):
                ids = np.arange(seen, seen + len(block))[enter]
                sample, sample_keys, sample_ids = _keep_smallest(
                    sample, sample_keys, sample_ids, block[enter], draws[enter], ids, sample_size
                )
            seen += len(block)
        keys = pd.array(pa.chunked_array(key_blocks, pa.string()), dtype="str")
        _check_new_keys(keys, set(), cls.key)
        if len(keys) == 0:
            raise UsageError("empty collection: the chunks held no vectors (check the ids and embeddings given)")
        log.info("pass 1: checked %d vectors, kept a sample of %d (%.0f s)", len(keys), len(sample),
                 time.perf_counter() - started)
        chosen, params = _choose(kind, len(keys), dim, cls.content)
        index = kinds.create_index(chosen, dim, params)
        order = np.argsort(sample_keys, kind="stable")
        started = time.perf_counter()
        kinds.train_index(index, chosen, sample[np.sort(order)], seed=seed)
        log.info("trained %s in %.0f s", chosen, time.perf_counter() - started)
        query_rows = np.sort(order[: kinds.TUNE_QUERIES])
        queries, query_ids = np.ascontiguousarray(sample[query_rows]), sample_ids[query_rows]
        del sample
        kinds.reserve(index, chosen, len(keys))
        width = min(recall_k + 1, len(keys))
        best = np.full((len(queries), width), -np.inf, np.float32)
        best_ids = np.full((len(queries), width), -1, np.int64)
        start, started = 0, time.perf_counter()
        for block, _ in _blocks(chunks(), dim, key_blocks, digests, first_pass=False):
            ids = np.arange(start, start + len(block), dtype=np.int64)
            index.add_with_ids(block, ids)
            found, nearest = faiss.knn(queries, block, min(width, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            best, best_ids = kinds.merge_topk(best, best_ids, found, np.where(nearest >= 0, nearest + start, -1))
            start += len(block)
            log.debug("added %d of %d %s", start, len(keys), cls.content)
        log.info("pass 2: added %d vectors and found the exact neighbours of %d tuning queries (%.0f s)",
                 start, len(queries), time.perf_counter() - started)
        exact = kinds.topk_without_self(best_ids, query_ids, recall_k)
        params, recall = kinds.tune_on(index, chosen, params, queries, query_ids, exact, target=target_recall,
                                       k=recall_k)
        return cls._assemble(index, chosen, kind, params, recall, keys, metadata, model, model_path, source, gpu)

    @classmethod
    def _assemble(
        cls: type[T],
        index: faiss.Index,
        chosen: str,
        kind: str,
        params: dict[str, Any],
        recall: dict[str, Any],
        keys: Sequence[str],
        metadata: pd.DataFrame | None,
        model: SlideTextModel,
        model_path: str | None,
        source: dict[str, Any] | None,
        gpu: bool,
    ) -> T:
        """The index object around a built FAISS index whose ids are 0..len(keys)-1."""
        now = _now()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "vlm_version": __version__,
            "content": cls.content, "model": {**model_fingerprint(model), "path": model_path},
            "kind": chosen, "requested_kind": kind, "params": params, "metric": "inner product of L2-normalised",
            "dim": int(index.d), "count": len(keys), "next_id": len(keys), "recall": recall,
            "source": source or {}, "created": now, "updated": now,
        }
        table = pd.DataFrame({ID_COLUMN: np.arange(len(keys), dtype=np.int64), cls.key: keys})
        return cls(index, _join_metadata(table, metadata, cls.key), manifest, model=model, gpu=gpu)

    # --- persistence ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the folder atomically (`atomic_dir`), the manifest recording each data file's SHA-256.

        `path` must be new, empty, or a vlm index folder: any other folder is refused, so that a mistyped
        `--out` never replaces a folder of data.
        """
        check_index_folder(path, overwrite=True)
        with atomic_dir(path) as tmp:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            self.metadata.to_parquet(tmp / METADATA_FILE, index=False)
            files = {name: file_sha256(tmp / name) for name in (INDEX_FILE, METADATA_FILE)}
            self.manifest.update(format_version=FORMAT_VERSION, files=files)
            (tmp / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls: type[T], path: str | os.PathLike[str], model: ModelArg | None = None, gpu: bool = False) -> T:
        """Read an index folder; a given `model` (object or folder) must be the one it was built with."""
        path = Path(path)
        manifest = read_manifest(path)
        if manifest.get("content") != cls.content:
            other = "ReportIndex" if manifest.get("content") == "reports" else "SlideIndex"
            raise InputError(f"{path} indexes {manifest.get('content')}, not {cls.content}; load it with {other}")
        index, metadata = _read_data_files(path, manifest)
        if index.d != manifest["dim"] or len(metadata) != manifest["count"]:
            raise InputError(
                f"{path}: index.faiss ({index.d}-d) / metadata.parquet ({len(metadata)} rows) do not match "
                f"manifest.json ({manifest['dim']}-d, {manifest['count']} items); the folder mixes files of "
                "different builds: rebuild it"
            )
        _check_ids(path, index, metadata, manifest["kind"])
        loaded = cls(index, metadata, manifest, gpu=gpu)
        if model is not None:
            model_object, _ = resolve_model(model)
            loaded.model = model_object
        return loaded

    # --- editing ----------------------------------------------------------------------------------
    def add(
        self, embeddings: np.ndarray | torch.Tensor, slide_ids: Sequence[str], metadata: pd.DataFrame | None = None
    ) -> None:
        """Project and add new slides (their unprojected embeddings [N, E]); ids already indexed are refused."""
        self.add_vectors(project_slides(self.model, embeddings), slide_ids, metadata)

    def add_vectors(self, vectors: np.ndarray, keys: Sequence[str], metadata: pd.DataFrame | None = None) -> None:
        """Add joint-space vectors [N, D] under new keys, with fresh ids; no retraining or retuning."""
        keys = [str(k) for k in keys]
        vectors = _check_vectors(vectors, len(keys), self.dim)
        _check_new_keys(keys, set(self._row), self.key)
        start = int(self.manifest["next_id"])
        ids = np.arange(start, start + len(keys), dtype=np.int64)
        self.index.add_with_ids(vectors, ids)
        rows = _join_metadata(pd.DataFrame({ID_COLUMN: ids, self.key: keys}), metadata, self.key)
        self.metadata = pd.concat([self.metadata, rows], ignore_index=True)
        self.manifest.update(next_id=start + len(keys), count=len(self.metadata), updated=_now())
        self._refresh()
        log.info("added %d %s; the index now holds %d", len(keys), self.content, len(self))

    def remove(self, keys: Sequence[str]) -> None:
        """Remove indexed items by key (slide id); unknown keys are refused before anything changes."""
        keys = list(dict.fromkeys(str(k) for k in keys))
        if not keys:
            raise UsageError(f"no {self.key} given to remove")
        unknown = [k for k in keys if k not in self._row]
        if unknown:
            raise InputError(
                f"unknown {self.key}(s) {unknown[:10]} ({len(unknown)} in all) are not in the index; "
                f"nothing was removed. Check the ids (the index holds {len(self)} {self.content})"
            )
        rows = [self._row[k] for k in keys]
        ids = self.metadata[ID_COLUMN].to_numpy()[rows].astype(np.int64)
        if self.kind == "flat":
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
        self.metadata = self.metadata.drop(index=rows).reset_index(drop=True)
        self.manifest.update(count=len(self.metadata), updated=_now())
        self._refresh()
        log.info("removed %d %s; the index now holds %d", len(keys), self.content, len(self))

    def _refresh(self) -> None:
        """Recompute what derives from the metadata: id -> row, tombstones, the GPU copy (key -> row on first use)."""
        self._rows_by_key: dict[str, int] | None = None
        self._id_rows = pd.Index(self.metadata[ID_COLUMN])  # faiss id -> metadata row (hashed once)
        self._deleted = np.setdiff1d(
            faiss.vector_to_array(self.index.id_map), self.metadata[ID_COLUMN].to_numpy(np.int64)
        )
        if self.index.ntotal and len(self._deleted) > TOMBSTONE_WARNING * self.index.ntotal:
            log.warning(
                "%d of %d stored vectors are removed items that every search skips; rebuild the index "
                "(`vlm index build`) to reclaim the memory and speed", len(self._deleted), self.index.ntotal,
            )
        self._skip = kinds.removal_filter(self.index, self.kind, self._deleted)
        self._search_index = kinds.to_gpu(self.index, self.kind) if self._gpu else None

    @property
    def _row(self) -> dict[str, int]:
        """key -> metadata row, built when first needed: at 10M keys the table takes ~1.5 GB, which a process
        that only searches by vector or text never pays."""
        if self._rows_by_key is None:
            self._rows_by_key = {key: i for i, key in enumerate(self.metadata[self.key])}
        return self._rows_by_key

    # --- searching --------------------------------------------------------------------------------
    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Joint-space queries [Q, D] -> scores [Q, k] and faiss ids [Q, k] (-1 where fewer were found)."""
        if len(self) == 0:
            raise InputError("the index is empty; add slides with `vlm index add` first")
        if k < 1:
            raise UsageError(f"k must be >= 1, got {k}")
        vectors = _check_vectors(vectors, len(vectors), self.dim)
        if self._search_index is not None:  # GPU: no id filters there, so fetch extra and drop tombstones
            fetch = min(k + len(self._deleted), 2048)
            if "nprobe" in self.params:
                faiss.GpuParameterSpace().set_index_parameter(self._search_index, "nprobe", self.params["nprobe"])
            scores, ids = self._search_index.search(vectors, fetch)
            keep = ~np.isin(ids, self._deleted)
            return _compact(scores, ids, keep, k)
        params = kinds.search_params(self.kind, self.params, k, self._skip)
        with kinds.threads_for(len(vectors)):
            return self.index.search(vectors, k, params=params)

    def search_text(self, texts: str | Sequence[str], k: int = 10) -> pd.DataFrame:
        """Items nearest to each text (a report phrase), as a table (see `results`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        empty = [i for i, text in enumerate(texts) if not str(text).strip()]
        if empty or not texts:
            raise InputError(
                f"empty query text (query {empty[:5] or 'list'}): give words to search for, e.g. a report phrase"
            )
        vectors = self.model.encode_text(texts, device="cpu").numpy()
        return self.results(*self.search_vectors(vectors, k), k=k)

    def search_embeddings(self, embeddings: np.ndarray | torch.Tensor, k: int = 10) -> pd.DataFrame:
        """Items nearest to unprojected slide embeddings [Q, E] (e.g. a slide not in this index)."""
        return self.results(*self.search_vectors(project_slides(self.model, embeddings), k), k=k)

    def search_slide(self, slide_ids: str | Sequence[str], k: int = 10, include_self: bool = False) -> pd.DataFrame:
        """Slides nearest to indexed slides (read back from the index; no model needed).

        The query slide itself is left out of its results unless `include_self`. With `ivfpq` the read-back
        vector is its 8-bit copy, so scores are approximate.
        """
        return self._search_items(slide_ids, k, include_self)

    def _search_items(self, keys: str | Sequence[str], k: int, include_self: bool) -> pd.DataFrame:
        keys = [keys] if isinstance(keys, str) else [str(key) for key in keys]
        unknown = [key for key in keys if key not in self._row]
        if unknown:
            raise InputError(f"unknown {self.key}(s) {unknown[:10]}: not in this index of {len(self)} {self.content}")
        ids = self.metadata[ID_COLUMN].to_numpy()[[self._row[key] for key in keys]]
        vectors = np.stack([self.index.reconstruct(int(i)) for i in ids])  # [Q, D]
        scores, found = self.search_vectors(vectors, k + (0 if include_self else 1))
        return self.results(scores, found, k=k, exclude=None if include_self else ids)

    def results(self, scores: np.ndarray, ids: np.ndarray, k: int, exclude: np.ndarray | None = None) -> pd.DataFrame:
        """One row per hit: query (0-based), rank (1-based), the key, score, then the metadata columns."""
        frames = []
        for q, (row_scores, row_ids) in enumerate(zip(scores, ids, strict=True)):
            rows = self._rows_of(row_ids)  # -1: no hit, or a removed item
            keep = (rows >= 0) & (row_ids != (exclude[q] if exclude is not None else -1))
            hit_rows, hit_scores = rows[keep][:k], row_scores[keep][:k]
            hits = self.metadata.iloc[hit_rows].drop(columns=[ID_COLUMN]).reset_index(drop=True)
            hits.insert(0, "score", hit_scores.astype(float))
            hits.insert(0, "rank", np.arange(1, len(hits) + 1))
            hits.insert(0, "query", q)
            frames.append(hits)
        table = pd.concat(frames, ignore_index=True)
        return table[[*RESULT_COLUMNS[:2], self.key, "score", *[c for c in table.columns if c not in
                                                                 (*RESULT_COLUMNS, self.key)]]]

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        return self._id_rows.get_indexer(ids)


def result_records(results: pd.DataFrame) -> list[dict[str, Any]]:
    """Search results as JSON-ready dicts, without the query column (`vlm search --json`, `vlm serve`'s API):
    NumPy scalars as Python numbers, missing metadata (NaN) as null."""

    def plain(value: Any) -> Any:
        value = value.item() if hasattr(value, "item") else value
        return None if isinstance(value, float) and value != value else value

    rows = results.drop(columns=["query"]).to_dict("records")
    return [{key: plain(value) for key, value in row.items()} for row in rows]


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of an index folder, checked to be one this vlm reads (finishing an interrupted write)."""
    recover_dir(path)
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise MissingInputError(f"{path}: not an index folder (no {MANIFEST_FILE}); build one with `vlm index build`")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{file}: not valid JSON ({error}); rebuild the index") from error
    if manifest.get("format") != FORMAT:
        raise InputError(f"{file}: not a vlm index manifest (format={manifest.get('format')!r})")
    if not isinstance(manifest.get("format_version"), int) or manifest["format_version"] > FORMAT_VERSION:
        raise InputError(
            f"{file}: format_version {manifest.get('format_version')!r} is newer than this vlm reads; upgrade vlm"
        )
    return manifest


def check_index_folder(path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Refuse to write an index where it would replace something else.

    A missing or empty folder is fine (`.` included); an existing vlm index is replaced only with
    `overwrite`; any other folder is refused, whatever `overwrite` says (it may hold the user's data).
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path}: exists and is a file, not an index folder; choose another `out`")
    entries = sorted(entry.name for entry in path.iterdir() if not entry.name.startswith(INTERNAL_PREFIX))
    if not entries:
        return
    try:
        read_manifest(path)
    except (FileNotFoundError, ValueError):
        raise foreign_folder_error(path, entries, "a vlm index") from None
    if not overwrite:
        raise FileExistsError(f"{path}: a vlm index is already there; pass `overwrite` to replace it")


def _read_data_files(path: Path, manifest: dict[str, Any]) -> tuple[faiss.Index, pd.DataFrame]:
    """index.faiss and metadata.parquet, each checked against its SHA-256 in the manifest before parsing."""
    recorded = manifest.get("files")
    if recorded is None:
        log.warning("%s: an index written before checksums were recorded; damage cannot be detected. Rebuild it "
                    "(or `vlm index add` / `remove` once) to add them", path)
    for name in (INDEX_FILE, METADATA_FILE):
        file = path / name
        if not file.is_file():
            raise MissingInputError(f"{file}: missing from the index folder; rebuild the index")
        if recorded is not None and file_sha256(file) != recorded.get(name):
            raise InputError(
                f"{file}: damaged or changed since the index was written (its SHA-256 differs from the one in "
                f"{MANIFEST_FILE}); rebuild the index with `vlm index build`"
            )
    try:
        index = faiss.read_index(str(path / INDEX_FILE))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
        raise InputError(f"{path / INDEX_FILE}: not a readable FAISS index ({first}); rebuild the index") from error
    try:
        metadata = pd.read_parquet(path / METADATA_FILE)
    except (OSError, ValueError) as error:
        raise InputError(f"{path / METADATA_FILE}: not a readable parquet file ({error}); rebuild the index") from error
    return index, metadata


def _check_ids(path: Path, index: faiss.Index, metadata: pd.DataFrame, kind: str) -> None:
    """Every metadata row has exactly one vector; a flat index (which deletes) holds nothing else."""
    stored = faiss.vector_to_array(index.id_map) if hasattr(index, "id_map") else np.zeros(0, np.int64)
    rows = metadata[ID_COLUMN].to_numpy(np.int64) if ID_COLUMN in metadata.columns else np.zeros(0, np.int64)
    problems = []
    if not hasattr(index, "id_map") or len(stored) != index.ntotal:
        problems.append("the id map does not cover the vectors")
    if len(np.unique(stored)) != len(stored):
        problems.append("an id is stored twice")
    if len(np.unique(rows)) != len(rows):
        problems.append(f"metadata.parquet repeats a {ID_COLUMN}")
    lost = np.setdiff1d(rows, stored)
    if len(lost):
        problems.append(f"{len(lost)} indexed item(s) have no vector (e.g. {ID_COLUMN} {lost[:3].tolist()})")
    if kind == "flat" and len(np.setdiff1d(stored, rows)):
        problems.append("a flat index holds vectors of no item (it deletes removed ones)")
    if problems:
        raise InputError(f"{path}: index.faiss and metadata.parquet disagree: {'; '.join(problems)}; rebuild it")


def _check_vectors(vectors: np.ndarray, n: int, dim: int) -> np.ndarray:
    if n == 0:
        raise InputError("empty collection: nothing to index or search (check the ids and embeddings given)")
    vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise UsageError(f"expected {n} vectors as an [N, D] array, got shape {vectors.shape}")
    if vectors.shape[1] != dim:
        raise InputError(
            f"dimension mismatch: vectors are {vectors.shape[1]}-d but the index holds {dim}-d vectors; "
            "use the model the index was built with"
        )
    if not np.isfinite(vectors).all():
        raise UsageError("vectors contain NaN or infinite values; check the slide embeddings")
    return vectors


def _check_new_keys(keys: Sequence[str], existing: set[str], name: str) -> None:
    repeated = duplicate_ids(keys)
    if repeated:
        raise InputError(f"duplicate {name}(s) {repeated[:10]} in the input; keep one row per {name}")
    present = sorted(set(keys) & existing) if existing else []
    if present:
        raise InputError(
            f"{name}(s) {present[:10]} ({len(present)} in all) are already in the index; remove them first "
            "(`vlm index remove`) to replace their embeddings"
        )


def _join_metadata(table: pd.DataFrame, metadata: pd.DataFrame | None, key: str) -> pd.DataFrame:
    """The id/key table with the user's columns for those keys (missing rows get empty cells)."""
    if metadata is None:
        return table
    if key not in metadata.columns:
        raise InputError(f"the metadata table needs a {key!r} column; found {list(metadata.columns)}")
    clash = sorted(set(metadata.columns) & {ID_COLUMN, *RESULT_COLUMNS})
    if clash:
        raise InputError(f"metadata column name(s) {clash} are reserved for search results; rename them")
    metadata = metadata.assign(**{key: metadata[key].astype(str)})
    repeated = duplicate_ids(metadata[key])
    if repeated:
        raise InputError(f"the metadata table lists {key}(s) {repeated[:10]} more than once; keep one row each")
    joined = table.merge(metadata, on=key, how="left")
    missing = int(joined[key].isin(metadata[key]).eq(False).sum())
    if missing:
        log.warning("%d indexed item(s) have no row in the metadata table", missing)
    return joined


def _compact(scores: np.ndarray, ids: np.ndarray, keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-align the kept hits of each row into [Q, k] arrays padded with -1 ids."""
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    for q in range(len(ids)):
        hits = np.flatnonzero(keep[q] & (ids[q] >= 0))[:k]
        out_scores[q, : len(hits)], out_ids[q, : len(hits)] = scores[q, hits], ids[q, hits]
    return out_scores, out_ids


def _choose(kind: str, n: int, dim: int, content: str) -> tuple[str, dict[str, Any]]:
    """The kind to build (`auto` resolved by size, saying why) and its build parameters."""
    if kind not in kinds.KINDS:
        raise InputError(f"unknown index kind {kind!r}; choose one of {', '.join(kinds.KINDS)}")
    chosen = kinds.choose_kind(n) if kind == "auto" else kind
    params = kinds.default_params(chosen, n, dim)
    why = f" (auto: {kinds.why_kind(n)})" if kind == "auto" else ""
    log.info("building a %s index of %d %s (%d-d)%s, params %s", chosen, n, content, dim, why, params)
    return chosen, params


def _blocks(
    chunks: Iterable[tuple[np.ndarray, Sequence[str]]],
    dim: int,
    key_blocks: list[pa.Array],
    digests: list[bytes],
    first_pass: bool,
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Checked (vectors, keys) blocks of one pass of `from_vector_chunks`. The first pass records each block's
    keys and a digest of its vectors; the second refuses a block whose keys or bytes differ (the chunks must be
    re-readable)."""
    seen, number = 0, -1
    for number, (vectors, block_keys) in enumerate(chunks):
        block_keys = [str(k) for k in block_keys]
        vectors = _check_vectors(vectors, len(block_keys), dim)
        digest = hashlib.blake2b(vectors, digest_size=16).digest()  # the contiguous array itself, no copy
        if first_pass:
            key_blocks.append(pa.array(block_keys, pa.string()))
            digests.append(digest)
        elif number >= len(digests) or digest != digests[number] or key_blocks[number].to_pylist() != block_keys:
            raise UsageError(
                f"chunk {number} differs between the two passes over the chunks (its keys or vectors changed, or "
                "there are more chunks); chunks() must yield the same blocks each time it is called"
            )
        seen += len(block_keys)
        yield vectors, block_keys
    if not first_pass and number + 1 != len(digests):
        first = sum(len(block) for block in key_blocks)
        raise UsageError(
            f"the second pass over the chunks yielded {seen} vectors, the first {first}; chunks() must yield the "
            "same blocks each time it is called"
        )


def _keep_smallest(
    rows: np.ndarray, draws: np.ndarray, ids: np.ndarray, new_rows: np.ndarray, new_draws: np.ndarray,
    new_ids: np.ndarray, size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of the kept and the new rows, the `size` with the smallest draws; evicted rows' slots are reused in
    place, so a full sample is never copied."""
    if len(rows) + len(new_rows) <= size:
        return (np.concatenate([rows, new_rows]), np.concatenate([draws, new_draws]),
                np.concatenate([ids, new_ids]))
    if len(rows) < size:  # fill up to `size` first, so the slots to reuse exist
        fill = size - len(rows)
        rows, draws, ids = (np.concatenate([rows, new_rows[:fill]]), np.concatenate([draws, new_draws[:fill]]),
                            np.concatenate([ids, new_ids[:fill]]))
        new_rows, new_draws, new_ids = new_rows[fill:], new_draws[fill:], new_ids[fill:]
    everything = np.concatenate([draws, new_draws])
    keep = np.argpartition(everything, size - 1)[:size]
    entering = keep[keep >= size] - size
    evicted = np.setdiff1d(np.arange(size), keep[keep < size])
    rows[evicted], draws[evicted], ids[evicted] = new_rows[entering], new_draws[entering], new_ids[entering]
    return rows, draws, ids


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

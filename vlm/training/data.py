"""Training data: splits of the slide–report pairs (`vlm.formats.pairs`), the reports' tokens, and the slide
inputs the pairs point to.

Splits are made by patient when a `patient_id` column exists (else by slide), so no patient's slides or
reports appear in two splits: a model that saw one slide of a patient in training would look better on
that patient's other slides than it is. A given `split` column is obeyed as is, and `test` rows are never
trained on nor used to pick a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from vlm.errors import InputError, MissingInputError
from vlm.formats.pairs import Pairs
from vlm.io import cache_folder

log = logging.getLogger(__name__)

def assign_splits(pairs: Pairs, val_fraction: float = 0.1, test_fraction: float = 0.0, seed: int = 0) -> Pairs:
    """Split by patient (or slide) when no split is given; a given split is returned unchanged.

    Whole groups are shuffled with `seed` and cut into test, val, then train. With at least two groups and
    a positive `val_fraction`, validation gets at least one group.
    """
    if pairs.splits is not None:
        return pairs
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise InputError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise InputError("val_fraction + test_fraction must leave some pairs for training")
    groups = sorted(set(pairs.groups()))
    random.Random(seed).shuffle(groups)
    n_test = round(test_fraction * len(groups))
    n_val = round(val_fraction * len(groups))
    if val_fraction > 0 and n_val == 0 and len(groups) - n_test >= 2:
        n_val = 1
    split_of = {g: "test" for g in groups[:n_test]}
    split_of.update({g: "val" for g in groups[n_test : n_test + n_val]})
    splits = [split_of.get(g, "train") for g in pairs.groups()]
    return Pairs(pairs.slide_ids, pairs.reports, pairs.patient_ids, splits)


def tokens_cache_dir() -> Path:
    """`$VLM_CACHE/tokens` when VLM_CACHE is set, else `~/.cache/vlm/tokens`."""
    return cache_folder("tokens")


class ReportTokens:
    """Every report tokenised once, through `datasets.Dataset.map` and its on-disk Arrow cache.

    Tokenising a corpus of 100k reports takes minutes; the cache file is keyed by the reports, the tokenizer
    and `max_length`, so a re-run, a resumed run or another run on the same reports reads the tokens back
    instead (memory-mapped, not held in RAM). `batch` pads rows to the longest of the batch, exactly as
    `TextEncoder.tokenize` does; the untruncated length is kept to count truncated reports.
    """

    def __init__(self, reports: list[str], tokenizer: Any, max_length: int, cache_dir: Path | None = None) -> None:
        from datasets import Dataset

        self.tokenizer, self.max_length = tokenizer, max_length
        key = _tokens_key(reports, tokenizer, max_length)
        folder = cache_dir if cache_dir is not None else tokens_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        self.cache_file = folder / f"reports-{key[:32]}.arrow"
        self.cached = self.cache_file.is_file()

        def tokenize(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
            out = dict(tokenizer(batch["report"], truncation=True, max_length=max_length))
            out["length"] = [len(ids) for ids in tokenizer(batch["report"], truncation=False)["input_ids"]]
            return out

        self.table = Dataset.from_dict({"report": reports}).map(
            tokenize,
            batched=True,
            batch_size=1000,
            remove_columns=["report"],
            cache_file_name=str(self.cache_file),
            new_fingerprint=key[:32],
            desc="tokenising reports",
        )
        if len(self.table) != len(reports):  # a cache file of other reports would pair texts with wrong rows
            raise InputError(f"{self.cache_file}: holds {len(self.table)} rows for {len(reports)} reports; delete it")
        self.columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in self.table.column_names]
        log.info("%d reports' tokens %s %s", len(reports), "read from" if self.cached else "cached in", self.cache_file)

    def count_truncated(self, rows: Sequence[int]) -> int:
        """How many of these rows' reports are longer than `max_length` tokens and get cut."""
        lengths = self.table.select_columns(["length"])[list(rows)]["length"] if rows else []
        return sum(n > self.max_length for n in lengths)

    def batch(self, rows: Sequence[int], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Padded tensors of these rows, as `TextEncoder.tokenize` returns for their texts."""
        picked = self.table.select_columns(self.columns)[list(rows)]
        length = max(len(ids) for ids in picked["input_ids"])
        fill = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0,
                "token_type_ids": getattr(self.tokenizer, "pad_token_type_id", 0)}
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        out = {}
        for column in self.columns:
            padded = [[fill[column]] * (length - len(r)) + r if left else r + [fill[column]] * (length - len(r))
                      for r in picked[column]]
            out[column] = torch.tensor(padded, dtype=torch.long, device=device)
        return out


def _tokens_key(reports: list[str], tokenizer: Any, max_length: int) -> str:
    """SHA-256 of what the tokens depend on: the reports, the tokenizer's full definition and `max_length`."""
    digest = hashlib.sha256(f"vlm-report-tokens-1|{type(tokenizer).__name__}|{max_length}|".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    digest.update(hashlib.sha256(definition.encode()).digest())
    for report in reports:
        digest.update(hashlib.sha256(report.encode()).digest())
    return digest.hexdigest()


def feature_slide_ids(folder: str | os.PathLike[str]) -> set[str]:
    """Slide ids with a `<slide_id>.h5` feature file in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: not a folder of tile-feature files; make it with `vlm embed-tiles`")
    return {p.stem for p in folder.glob("*.h5")}


def check_feature_files(
    pairs: Pairs,
    folder: Path,
    drop_bad: bool = False,
    mpp: float | None = None,
    patches: str | os.PathLike[str] | None = None,
) -> Pairs:
    """Open every paired slide's feature file before training and list all that cannot be used.

    A bad file found mid-run (hours in, at the first batch that holds it) would stop training with one name;
    here only the grid and the dataset shapes are read (not the features), with the rules of
    `vlm.encoders.slide_inputs.load_slide_inputs` (same `mpp`, `patches`, position grid), so the check is quick.
    With `drop_bad` the pairs of those slides are dropped with a warning, as `--drop-missing` does.
    """
    from vlm.encoders.positions import to_gigapath_coords
    from vlm.formats.features import feature_shape, read_tile_grid

    bad: dict[str, str] = {}
    dims: dict[str, int] = {}
    for slide_id in sorted(set(pairs.slide_ids)):
        path = folder / f"{slide_id}.h5"
        try:
            grid = read_tile_grid(path, mpp=mpp, patches=patches)
            shape = feature_shape(path)
            if len(shape) != 2 or shape[0] != len(grid) or len(grid) == 0:
                raise InputError(f"{path}: 'features' has shape {shape} but 'coords' has {len(grid)} rows")
            to_gigapath_coords(grid.coords, grid.mpp, slide_id, tile_size_level0=grid.tile_size_level0)
            dims[slide_id] = int(shape[1])
        except (ValueError, OSError) as error:
            bad[slide_id] = str(error)
    if len(set(dims.values())) > 1:  # one slide encoder takes one feature width: the rarer widths are wrong
        common = max(set(dims.values()), key=list(dims.values()).count)
        for slide_id, dim in dims.items():
            if dim != common:
                bad[slide_id] = f"{folder / slide_id}.h5: {dim}-d features, but most files have {common}-d"
    if not bad:
        return pairs
    listing = "\n".join(f"  {slide_id}: {why}" for slide_id, why in sorted(bad.items())[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    if not drop_bad:
        raise InputError(
            f"{folder}: {len(bad)} feature file(s) of paired slides cannot be used:\n{listing}{more}\n"
            "fix or re-make them, or pass `drop_missing` to train without these slides"
        )
    log.warning("dropping pairs of %d slide(s) whose feature files cannot be used:\n%s%s", len(bad), listing, more)
    return pairs.select([i for i, s in enumerate(pairs.slide_ids) if s not in bad])


def load_slide_features(
    folder: Path,
    slide_ids: list[str],
    max_tiles: int | None = None,
    seed: int = 0,
    mpp: float | None = None,
    patches: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile features [B, L, D], 0.5-mpp coords [B, L, 2] and padding mask [B, L] (True = pad) for a batch.

    Each slide goes through `vlm.encoders.slide_inputs.load_slide_inputs`, the path `vlm embed-slides` and
    zero-shot use, so a fine-tuned model is trained on the positions it is later given. `max_tiles`
    subsamples larger slides at random (after positions are fixed), bounding memory per slide; the draw
    depends only on `seed` and the slide id, so GradCache's second pass (and a resumed run) picks the same
    tiles. `mpp` and `patches` are as for `vlm embed-slides` (`--mpp`, `--patches`).
    """
    from vlm.encoders.slide_inputs import load_slide_inputs, pad_batch

    slides = [
        load_slide_inputs(Path(folder) / f"{slide_id}.h5", mpp=mpp, patches=patches, max_tiles=max_tiles, seed=seed)
        for slide_id in slide_ids
    ]
    return pad_batch(slides)


_Load = tuple[tuple[str, ...], int | None, int]  # slide ids, max_tiles, seed


class PrefetchingFeatureLoader:
    """`load_slide_features` one call ahead on a background thread, following a plan of upcoming calls.

    Fine-tuning reads every slide of a step twice (GradCache's two passes) and a 10k-tile slide is ~60 MB
    of features; reading the next chunk while the GPU encodes the current one hides that I/O. The plan is
    only a hint: a call that does not match it is served synchronously and the plan is dropped, so results
    never depend on it. At most one chunk is loaded ahead, which bounds the extra memory.
    """

    def __init__(
        self, folder: Path, mpp: float | None = None, patches: str | os.PathLike[str] | None = None
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.folder = folder
        self.options = {"mpp": mpp, "patches": patches}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-features")
        self._plan: list[_Load] = []
        self._pending: tuple[_Load, Future[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] | None = None

    def plan(self, calls: list[tuple[list[str], int | None, int]]) -> None:
        """Announce the next calls (slide ids, max_tiles, seed) in order and start loading the first."""
        self._plan = [(tuple(ids), max_tiles, seed) for ids, max_tiles, seed in calls]
        self._pending = None
        self._submit_next()

    def _submit_next(self) -> None:
        self._pending = None
        if self._plan:
            key = self._plan.pop(0)
            self._pending = (
                key,
                self._executor.submit(load_slide_features, self.folder, list(key[0]), *key[1:], **self.options),
            )

    def load(
        self, slide_ids: list[str], max_tiles: int | None = None, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (tuple(slide_ids), max_tiles, seed)
        if self._pending is not None and self._pending[0] == key:
            result = self._pending[1].result()
            self._submit_next()
            return result
        self._plan, self._pending = [], None
        return load_slide_features(self.folder, slide_ids, max_tiles, seed, **self.options)

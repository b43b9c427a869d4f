"""The batch engine: every per-slide command runs its slides through `Batch`, so the batch rules live here once.

The rules (`vlm tile`, `vlm embed-tiles`, `vlm embed-slides`, `vlm heatmap`, `vlm zeroshot --heatmaps`):
- under `torchrun` (RANK/WORLD_SIZE) or with `--shard i/n`, items are split deterministically by sorted id,
  so shards never write the same file; two inputs with one id are refused (their outputs would collide);
- an item that is already done (its `is_done` predicate: output file exists, or row in the output table) is
  skipped unless `overwrite`; outputs are written atomically, so a killed run resumes where it stopped;
- a failing item is logged and recorded, and the batch goes on; the failures end up in
  `<folder>/failures<shard suffix>.csv` (`slide,error`, path on `BatchReport.failures`), and a clean run
  removes a stale one.

Three ways to drive a `Batch`: `run` (one item -> its own output files, optionally in worker processes),
`run_chunked` (items loaded one by one, processed in chunks, results gathered in one `Sink` such as the
slide-embeddings parquet, saved periodically), or a driver's own loop over `pending` calling `record` and
`finish` (the continuous tile stream of `vlm embed-tiles`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
from tqdm.auto import tqdm

from vlm.errors import NonFiniteError, UsageError, describe
from vlm.io import atomic_path, duplicate_ids

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Loaded = TypeVar("Loaded")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Shard:
    """Which part of a job this process does: `index` of `count` (0-based)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """From `--shard i/n` (0-based), else from torchrun's RANK/WORLD_SIZE, else the whole job."""
        if text is None:
            return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
        try:
            index_text, count_text = text.split("/")
            shard = cls(int(index_text), int(count_text))
        except ValueError:
            raise UsageError(f"`shard` must look like 'i/n' (e.g. 0/4), got {text!r}") from None
        if not 0 <= shard.index < shard.count:
            raise UsageError(f"`shard` {text!r}: need 0 <= i < n")
        return shard

    def select(self, items: Sequence[Item], key: Callable[[Item], str]) -> list[Item]:
        """This shard's items: every `count`-th of the items sorted by key, starting at `index`."""
        return sorted(items, key=key)[self.index :: self.count]

    @property
    def suffix(self) -> str:
        """A file-name suffix that keeps shards' shared files (failures.csv, the embeddings parquet) apart."""
        return "" if self.count == 1 else f".shard-{self.index}-of-{self.count}"


def failures_path(folder: str | os.PathLike[str], shard: Shard = Shard()) -> Path:
    """Where a batch writing into `folder` lists its failures: the one place this name is made."""
    return Path(folder) / f"failures{shard.suffix}.csv"


@dataclass
class BatchReport:
    """What a batch run did, item id by item id, and where its failures are listed (if any failed)."""

    failures: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return f"{len(self.done)} done, {len(self.skipped)} skipped (already done), {len(self.failed)} failed"


class Sink(Protocol[Result]):
    """Where `Batch.run_chunked` puts results that share one output (e.g. rows of one parquet file)."""

    def add(self, item_id: str, result: Result) -> None: ...

    def save(self) -> None:
        """Write everything added so far, atomically (called periodically and at the end: resumable)."""
        ...


class Batch(Generic[Item]):
    """One shard's pass over `items`: which are still to do (`pending`), progress, the report, failures.csv.

    Construction applies the entry rules (shard selection, duplicate-id refusal, skip what `is_done` says is
    finished unless `overwrite`; `is_done=None`: nothing is ever done, every item is redone); `finish` the
    exit rules (failures file written or a stale one removed, summary logged). `pending` is in id order, or
    in `order` (a sort key, e.g. length buckets). Use as a context manager so the progress bar closes.
    """

    def __init__(
        self,
        items: Sequence[Item],
        *,
        key: Callable[[Item], str],
        is_done: Callable[[Item], bool] | None,
        folder: str | os.PathLike[str],
        desc: str,
        shard: Shard = Shard(),
        overwrite: bool = False,
        progress: bool = True,
        order: Callable[[Item], Any] | None = None,
    ) -> None:
        self.key, self.desc = key, desc
        self.report = BatchReport(failures=failures_path(folder, shard))
        mine = shard.select(items, key)
        duplicates = duplicate_ids(key(item) for item in mine)
        if duplicates:
            raise UsageError(f"several inputs share the slide id(s) {duplicates}; rename them so outputs don't collide")
        self.pending: list[Item] = []
        for item in mine:
            if is_done is not None and not overwrite and is_done(item):
                self.report.skipped.append(key(item))
            else:
                self.pending.append(item)
        if order is not None:
            self.pending.sort(key=order)
        self._bar = tqdm(total=len(mine), initial=len(self.report.skipped), desc=desc, unit="slide",
                         disable=not progress)

    def __enter__(self) -> Batch[Item]:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def record(self, item: Item, error: BaseException | str | None = None) -> None:
        """Count one item done (`error` None) or failed (an exception or its message), logging failures."""
        item_id = self.key(item)
        if error is None:
            self.report.done.append(item_id)
        else:
            message = describe(error) if isinstance(error, str) else f"{type(error).__name__}: {describe(error)}"
            log.error("%s failed: %s", item_id, message)
            self.report.failed.append((item_id, message))
        self._bar.update()

    @contextlib.contextmanager
    def attempt(self, item: Item) -> Iterator[None]:
        """Run the block as `item`'s work: an exception marks it failed and is swallowed, else it is done."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # one bad slide must not stop a batch of thousands
            self.record(item, error)
        else:
            self.record(item, None)

    def finish(self) -> BatchReport:
        """Write this shard's failures file (or remove a stale one), log the summary, return the report."""
        self._bar.close()
        _write_failures(self.report.failures, self.report.failed)
        log.info("%s: %s", self.desc, self.report.summary())
        return self.report

    def run(self, process: Callable[[Item], None], workers: int = 1) -> BatchReport:
        """`process(item)` for each pending item; it must write the item's outputs atomically.

        With `workers > 1` items run in that many processes (`process` must then be picklable: a
        module-level function or a partial of one).
        """
        with self:
            if workers > 1 and len(self.pending) > 1:
                with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
                    futures = {pool.submit(process, item): item for item in self.pending}
                    for future in concurrent.futures.as_completed(futures):
                        self.record(futures[future], future.exception())
            else:
                for item in self.pending:
                    with self.attempt(item):
                        process(item)
            return self.finish()

    def run_chunked(
        self,
        load: Callable[[Item], Loaded],
        process: Callable[[list[Loaded]], Sequence[Result]],
        sink: Sink[Result],
        chunk_size: int = 1,
        save_every: int = 50,
    ) -> BatchReport:
        """Load each pending item alone, process them `chunk_size` at a time, put the results in `sink`.

        A failing `load` fails that item only. `process` returns one result per loaded item, in order; a
        chunk that raises (e.g. out of memory) is retried one item at a time, so only an item that fails
        alone is recorded failed. `sink.save()` runs after every `save_every` new results and at the end,
        so a killed run keeps what it finished.
        """
        if chunk_size < 1:
            raise UsageError(f"chunk size must be >= 1, got {chunk_size}")
        unsaved = 0

        def run(chunk: list[tuple[Item, Loaded]]) -> None:
            nonlocal unsaved
            try:
                results = process([loaded for _, loaded in chunk])
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as error:
                if len(chunk) == 1:
                    self.record(chunk[0][0], error)
                    return
                log.warning("a chunk of %d failed (%s); retrying its items one at a time", len(chunk), error)
                for one in chunk:
                    run([one])
                return
            for (item, _), result in zip(chunk, results, strict=True):
                sink.add(self.key(item), result)
                self.record(item, None)
            unsaved += len(chunk)
            if unsaved >= save_every:
                sink.save()
                unsaved = 0

        with self:
            chunk: list[tuple[Item, Loaded]] = []
            for item in self.pending:
                try:
                    chunk.append((item, load(item)))
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as error:  # one bad file must not stop a batch of thousands
                    self.record(item, error)
                if len(chunk) >= chunk_size:
                    run(chunk)
                    chunk = []
            if chunk:
                run(chunk)
            if unsaved:
                sink.save()
            return self.finish()


def _write_failures(path: Path, failed: list[tuple[str, str]]) -> None:
    """Write `slide,error` rows atomically; no failures removes a stale file from an earlier run."""
    if not failed:
        path.unlink(missing_ok=True)
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "error"])
        writer.writerows(failed)


def check_finite_output(values: np.ndarray, source: object, what: str) -> None:
    """A NaN or inf output row fails its slide (listed in failures.csv) instead of being written."""
    bad = ~np.isfinite(values).all(axis=-1)
    if bad.any():
        raise NonFiniteError(
            f"{source}: the {what} gave NaN/inf for {int(bad.sum())} of {len(values)} rows (first "
            f"{int(np.flatnonzero(bad)[0])}); nothing was written for this slide. Check its input values (e.g. "
            "overflowing features) and `precision`"
        )

"""Batch runs over many slides: resume, sharding, failures.csv, progress.

Every per-slide command (`vlm tile`, `vlm embed-tiles`, `vlm embed-slides`) shares these rules:
- an item whose output file exists is skipped (outputs are written atomically, so existing = finished);
- a failing item is logged and recorded, and the batch goes on; failures end up in a CSV;
- under `torchrun` (RANK/WORLD_SIZE) or with `--shard i/n`, items are split deterministically by sorted
  id, so shards never write the same file.
"""

from __future__ import annotations

import concurrent.futures
import csv
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from vlm.io import atomic_path, duplicate_ids

log = logging.getLogger(__name__)
Item = TypeVar("Item")


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
            raise ValueError(f"--shard must look like 'i/n' (e.g. 0/4), got {text!r}") from None
        if not 0 <= shard.index < shard.count:
            raise ValueError(f"--shard {text!r}: need 0 <= i < n")
        return shard

    def select(self, items: Sequence[Item], key: Callable[[Item], str]) -> list[Item]:
        """This shard's items: every `count`-th of the items sorted by key, starting at `index`."""
        return sorted(items, key=key)[self.index :: self.count]

    @property
    def suffix(self) -> str:
        """A file-name suffix that keeps shards' shared files (failures.csv) apart."""
        return "" if self.count == 1 else f".shard-{self.index}-of-{self.count}"


@dataclass
class BatchReport:
    """What a batch run did, item id by item id."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return f"{len(self.done)} done, {len(self.skipped)} skipped (already done), {len(self.failed)} failed"


def run_batch(
    items: Sequence[Item],
    *,
    key: Callable[[Item], str],
    output_of: Callable[[Item], Path],
    process: Callable[[Item], None],
    out_dir: Path,
    desc: str,
    shard: Shard = Shard(),
    progress: bool = True,
    overwrite: bool = False,
    workers: int = 1,
) -> BatchReport:
    """Run `process` on each of this shard's items whose output is missing; record failures.

    `process(item)` must write `output_of(item)` atomically. Any exception it raises marks that item
    failed (message kept) without stopping the batch. With `workers > 1` items run in that many
    processes (`process` must then be picklable: a module-level function or a partial of one).
    Failures are written to `out_dir/failures<shard suffix>.csv`; a clean run removes a stale one.
    """
    report = BatchReport()
    pending = select_pending(items, key=key, output_of=output_of, report=report, shard=shard, overwrite=overwrite)
    bar = tqdm(total=len(pending) + len(report.skipped), initial=len(report.skipped), desc=desc, unit="slide",
               disable=not progress)
    with bar:
        if workers > 1 and len(pending) > 1:
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(process, item): key(item) for item in pending}
                for future in concurrent.futures.as_completed(futures):
                    record(report, futures[future], future.exception())
                    bar.update()
        else:
            for item in pending:
                try:
                    process(item)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as error:  # one bad slide must not stop a batch of thousands
                    record(report, key(item), error)
                else:
                    record(report, key(item), None)
                bar.update()
    return finish_report(report, out_dir, shard, desc)


def select_pending(
    items: Sequence[Item],
    *,
    key: Callable[[Item], str],
    output_of: Callable[[Item], Path],
    report: BatchReport,
    shard: Shard = Shard(),
    overwrite: bool = False,
) -> list[Item]:
    """This shard's items still to do, in id order; those already done go to `report.skipped`.

    The first half of `run_batch`, for drivers that process items in their own way (the tile stream).
    """
    mine = shard.select(items, key)
    duplicates = duplicate_ids(key(item) for item in mine)
    if duplicates:
        raise ValueError(f"several inputs share the slide id(s) {duplicates}; rename them so outputs don't collide")
    pending = []
    for item in mine:
        if output_of(item).exists() and not overwrite:
            report.skipped.append(key(item))
        else:
            pending.append(item)
    return pending


def finish_report(report: BatchReport, out_dir: Path, shard: Shard, desc: str) -> BatchReport:
    """The last half of `run_batch`: write this shard's failures.csv (or remove a stale one) and log."""
    write_failures(out_dir / f"failures{shard.suffix}.csv", report.failed)
    log.info("%s: %s", desc, report.summary())
    return report


def record(report: BatchReport, item_id: str, error: BaseException | str | None) -> None:
    """Count one item done (`error` None) or failed (an exception or its message), logging failures."""
    if error is None:
        report.done.append(item_id)
        return
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    log.error("%s failed: %s", item_id, message)
    report.failed.append((item_id, message))


def write_failures(path: Path, failed: list[tuple[str, str]]) -> None:
    """Write `slide,error` rows atomically; no failures removes a stale file from an earlier run."""
    if not failed:
        path.unlink(missing_ok=True)
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "error"])
        writer.writerows(failed)

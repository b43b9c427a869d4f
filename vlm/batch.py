"""Batch runs over many slides: resume, sharding, failures.csv, progress.

Every per-slide command (`vlm tile`, `vlm embed-tiles`, `vlm embed-slides`) shares these rules:
- an item whose output file exists is skipped (outputs are written atomically, so existing = finished);
- a failing item is logged and recorded, and the batch goes on; failures end up in a CSV;
- under `torchrun` (RANK/WORLD_SIZE) or with `--shard i/n`, items are split deterministically by sorted
  id, so shards never write the same file.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from tqdm.auto import tqdm

from vlm.io import atomic_path

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
) -> BatchReport:
    """Run `process` on each of this shard's items whose output is missing; record failures.

    `process(item)` must write `output_of(item)` atomically. Any exception it raises marks that item
    failed (message kept) without stopping the batch. Failures are written to
    `out_dir/failures<shard suffix>.csv`; a clean run removes a stale failures file from earlier runs.
    """
    report = BatchReport()
    mine = shard.select(items, key)
    ids = [key(item) for item in mine]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"several inputs share the slide id(s) {duplicates}; rename them so outputs don't collide")
    for item in tqdm(mine, desc=desc, unit="slide", disable=not progress):
        item_id = key(item)
        if output_of(item).exists() and not overwrite:
            report.skipped.append(item_id)
            continue
        try:
            process(item)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # one bad slide must not stop a batch of thousands
            message = f"{type(error).__name__}: {error}"
            log.error("%s failed: %s", item_id, message)
            report.failed.append((item_id, message))
        else:
            report.done.append(item_id)
    _write_failures(out_dir / f"failures{shard.suffix}.csv", report.failed)
    log.info("%s: %s", desc, report.summary())
    return report


def _write_failures(path: Path, failed: list[tuple[str, str]]) -> None:
    if not failed:
        path.unlink(missing_ok=True)
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "error"])
        writer.writerows(failed)

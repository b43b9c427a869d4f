"""The slide–report pairs table: `slide_id`, `report` [, `patient_id`, `split`], read and checked.

A report describes a case, and a case may have several slides, each a row with the case's report. The case
rule (`Pairs.cases`), used by training batches, validation and `vlm eval retrieval`: rows that share a
`patient_id`, a `report` text or a `slide_id` are one case (transitively).

Training, retrieval (report index, evaluation) and the demo read pairs through `load_pairs`; the table
itself is read by `vlm.formats.tables.read_table`, the one table reader.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vlm.errors import InputError, UsageError
from vlm.formats.tables import read_table

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
REQUIRED_COLUMNS: tuple[str, ...] = ("slide_id", "report")


@dataclass
class Pairs:
    """Slide–report pairs, row-aligned lists; `split` is filled in by `assign_splits` when not given."""

    slide_ids: list[str]
    reports: list[str]
    patient_ids: list[str] | None = None
    splits: list[str] | None = None

    def __len__(self) -> int:
        return len(self.slide_ids)

    def indices(self, split: str) -> list[int]:
        """Row numbers of one split."""
        if self.splits is None:
            raise UsageError("splits are not assigned yet; call assign_splits first")
        return [i for i, s in enumerate(self.splits) if s == split]

    def groups(self) -> list[str]:
        """The unit a split must not cut: the patient when known, else the slide."""
        return self.patient_ids if self.patient_ids is not None else self.slide_ids

    def cases(self) -> list[int]:
        """Case number of each row (0, 1, … in order of first appearance).

        Rows sharing a `patient_id`, an identical `report` or a `slide_id` are one case, transitively: a
        case's slides are all right answers for its report, so they must never be each other's negatives in
        training nor each other's misses in retrieval metrics. Without `patient_id` and with distinct reports
        and slides, every row is its own case.
        """
        parent = list(range(len(self)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        keys = [self.slide_ids, self.reports] + ([self.patient_ids] if self.patient_ids is not None else [])
        for column in keys:
            first: dict[str, int] = {}
            for i, value in enumerate(column):
                j = first.setdefault(value, i)
                if j != i:
                    parent[root(i)] = root(j)
        number: dict[int, int] = {}
        return [number.setdefault(root(i), len(number)) for i in range(len(self))]

    def select(self, rows: list[int]) -> Pairs:
        def pick(values: list[str] | None) -> list[str] | None:
            return None if values is None else [values[i] for i in rows]

        return Pairs(
            [self.slide_ids[i] for i in rows],
            [self.reports[i] for i in rows],
            pick(self.patient_ids),
            pick(self.splits),
        )


def load_pairs(path: str | os.PathLike[str]) -> Pairs:
    """Read a CSV / TSV / Parquet / JSONL table of pairs (`vlm.formats.tables`), checking columns and values."""
    path = Path(path)
    table = read_table(path, required=REQUIRED_COLUMNS, what="pairs", all_text=True)
    columns = set(table.columns)
    slide_ids = _strings(table["slide_id"].tolist(), "slide_id", path)
    reports = _strings(table["report"].tolist(), "report", path)
    patients = _strings(table["patient_id"].tolist(), "patient_id", path) if "patient_id" in columns else None
    splits = None
    if "split" in columns:
        splits = [s.strip().lower() for s in table["split"]]
        bad = sorted({s for s in splits if s not in SPLITS})
        if bad:
            rows = [i + 2 for i, s in enumerate(splits) if s not in SPLITS][:5]
            raise InputError(
                f"{path}: unknown split value(s) {bad} (first data rows {rows}); use train, val or test, "
                "or drop the split column to split automatically by patient"
            )
    pairs = Pairs(slide_ids, reports, patients, splits)
    if splits is not None:
        check_no_leak(pairs, source=str(path))
    duplicated = len(slide_ids) - len(set(slide_ids))
    if duplicated:
        log.warning("%s: %d slide ids appear in more than one pair", path, duplicated)
    return pairs


def _strings(values: list[object], column: str, path: Path) -> list[str]:
    """Column as stripped strings; empty or missing cells are an error naming the rows (1 = header)."""
    out = ["" if v is None else str(v).strip() for v in values]
    empty = [i + 2 for i, v in enumerate(out) if not v]
    if empty:
        raise InputError(
            f"{path}: empty {column!r} in {len(empty)} row(s), first data rows {empty[:5]}; fill or drop them"
        )
    return out


def check_no_leak(pairs: Pairs, source: str = "pairs") -> None:
    """Refuse a split in which one patient (or slide) falls in two splits."""
    if pairs.splits is None:
        return
    seen: dict[str, set[str]] = {}
    for group, split in zip(pairs.groups(), pairs.splits, strict=True):
        seen.setdefault(group, set()).add(split)
    leaking = sorted(g for g, s in seen.items() if len(s) > 1)
    if leaking:
        unit = "patient" if pairs.patient_ids is not None else "slide"
        raise InputError(
            f"{source}: {len(leaking)} {unit}(s) appear in more than one split, e.g. {leaking[:5]}; "
            f"put each {unit} in a single split"
        )


def check_slides_available(pairs: Pairs, available: set[str], source: str, drop_missing: bool = False) -> Pairs:
    """Every paired slide must have an input (embedding or feature file); list those that do not.

    With `drop_missing`, those pairs are dropped with a warning instead (e.g. slides that failed tiling).
    """
    missing = sorted({s for s in pairs.slide_ids if s not in available})
    if not missing:
        return pairs
    if not drop_missing:
        raise InputError(
            f"{len(missing)} slide id(s) in the pairs have no input in {source}, e.g. {missing[:10]}; embed them "
            "first, fix the ids, or pass `drop_missing` to train without them"
        )
    log.warning("dropping pairs of %d slide(s) missing from %s, e.g. %s", len(missing), source, missing[:5])
    keep = [i for i, s in enumerate(pairs.slide_ids) if s in available]
    return pairs.select(keep)

"""Slide–report pairs as retrieval reads them (`vlm index build-reports`, `vlm eval retrieval`).

Retrieval reads pairs here rather than through the training package, so that it does not depend on
training; the table itself is read by `read_table`, the one table reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class Pairs:
    """Row-aligned slide ids and report texts, with optional patient ids and split names."""

    slide_ids: list[str]
    reports: list[str]
    patient_ids: list[str] | None = None
    splits: list[str] | None = None

    def __len__(self) -> int:
        return len(self.slide_ids)

    def indices(self, split: str) -> list[int]:
        """Row numbers of one split."""
        if self.splits is None:
            raise ValueError("these pairs have no split column")
        return [i for i, s in enumerate(self.splits) if s == split]

    def select(self, rows: list[int]) -> Pairs:
        def pick(values: list[str] | None) -> list[str] | None:
            return None if values is None else [values[i] for i in rows]

        return Pairs(pick(self.slide_ids) or [], pick(self.reports) or [], pick(self.patient_ids), pick(self.splits))


def load_pairs(path: str | os.PathLike[str]) -> Pairs:
    """A CSV / TSV / Parquet / JSONL table with `slide_id`, `report` [, `patient_id`, `split`] columns."""
    from vlm.retrieval.reports import read_table  # the table reader (imported here: reports imports this module)

    path = Path(path)
    table = read_table(path)
    missing = [c for c in ("slide_id", "report") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(table.columns)}. Rename them to "
                         "slide_id, report")  # fmt: skip
    if len(table) == 0:
        raise ValueError(f"{path}: no pairs (a header without rows)")

    def text(column: str) -> list[str]:
        values = ["" if v is None or v != v else str(v).strip() for v in table[column]]
        empty = [i + 2 for i, v in enumerate(values) if not v]
        if empty:
            raise ValueError(f"{path}: empty {column!r} in {len(empty)} row(s), first data rows {empty[:5]}; "
                             "fill or drop them")  # fmt: skip
        return values

    splits = None
    if "split" in table.columns:
        splits = [str(s).strip().lower() for s in table["split"].fillna("")]
        bad = sorted({s for s in splits if s not in SPLITS})
        if bad:
            raise ValueError(f"{path}: unknown split value(s) {bad}; use train, val or test, or drop the column")
    patients = text("patient_id") if "patient_id" in table.columns else None
    return Pairs(text("slide_id"), text("report"), patients, splits)

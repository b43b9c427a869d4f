"""The one reader of user tables: pairs, labels and metadata, from CSV, TSV, Parquet or JSON Lines.

Every command that takes a table reads it here, so every table gets the same treatment:
- ids stay text: `0001` is not turned into the number 1 (a slide id that lost its zeros matches nothing);
- a UTF-8 byte-order mark (what spreadsheet programs put at the start of a CSV export) is dropped, so the
  first column is `slide_id`, not `\\ufeffslide_id`;
- every problem (missing file, unknown extension, 0-byte file, header without rows, a line that does not
  parse, a missing column) is one `ValueError` / `FileNotFoundError` naming the file and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from vlm.errors import InputError, MissingInputError

SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".parquet", ".jsonl", ".json")


def is_id_column(name: str) -> bool:
    """Columns holding identifiers (`slide_id`, `patient_id`, `report_id`, `id`) are always read as text."""
    return name == "id" or name.endswith("_id")


def read_table(
    path: str | os.PathLike[str],
    *,
    required: Sequence[str] = (),
    what: str = "table",
    all_text: bool = False,
) -> pd.DataFrame:
    """Read a CSV / TSV / Parquet / JSONL table whose rows are the items of `what` ("pairs", "labels", ...).

    Id columns (see `is_id_column`) are text; with `all_text` every column is (labels and reports are words,
    not numbers). Missing cells of text columns are "" so callers test one empty value. Column names are
    stripped of surrounding spaces. `required` columns must be present.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such {what} file (expected one of {', '.join(SUFFIXES)})")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unknown {what} format {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes); a {what} table needs a header line and rows")
    try:
        frame = _read(path, suffix, all_text)
    except (ValueError, UnicodeDecodeError, OSError) as error:  # pandas/pyarrow/json parse errors
        if isinstance(error, FileNotFoundError):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a readable {suffix[1:].upper()} {what} table ({first})") from error
    frame.columns = [str(c).strip() for c in frame.columns]
    duplicated = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if duplicated:
        raise InputError(f"{path}: column(s) {duplicated} appear more than once; keep one of each")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {missing}; found {list(frame.columns)}. Rename the {what} columns to "
            f"{', '.join(required)}"
        )
    if len(frame) == 0:
        raise InputError(f"{path}: no rows (columns {list(frame.columns)} but no data); the {what} table is empty")
    for column in frame.columns:
        if all_text or is_id_column(column):
            frame[column] = _as_text(frame[column])
    return frame


def read_list(path: str | os.PathLike[str], what: str = "list") -> list[str]:
    """The entries of a one-per-line text file (ids, slide paths): stripped, blank lines and `#` comments
    left out, a byte-order mark dropped (a spreadsheet's export would otherwise make the first entry unknown)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such {what} file (one entry a line)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not a UTF-8 text {what} file ({error.reason} at byte {error.start})") from error
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_json_lines(text: str) -> list[Any]:
    """The values of a JSON Lines text: one JSON value a line, lines split on "\\n" only as the format defines
    (`str.splitlines` would also split inside strings holding U+2028, U+0085 or a lone "\\r"); a "\\r\\n"
    ending is whitespace JSON ignores; blank lines are skipped. A bad line is a ValueError naming its number."""
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise InputError(f"line {number} is not JSON: {error.msg}") from None
    return records


def _read(path: Path, suffix: str, all_text: bool) -> pd.DataFrame:
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv"):
        # Text columns (ids; every column with all_text) are read with keep_default_na=False, so "NA", "null",
        # "None", "nan" stay the ids or labels they are; other columns keep pandas' missing values (an empty
        # or "NA" number is NaN). utf-8-sig drops a byte-order mark.
        sep = "\t" if suffix == ".tsv" else ","
        header = pd.read_csv(path, sep=sep, nrows=0, encoding="utf-8-sig")
        text = [c for c in header.columns if all_text or is_id_column(str(c).strip())]
        frame = pd.read_csv(path, sep=sep, dtype=dict.fromkeys(text, str), keep_default_na=not all_text,
                            encoding="utf-8-sig")
        if text and not all_text:
            as_text = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, usecols=text, encoding="utf-8-sig")
            frame[text] = as_text[text]
        return frame
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".json" and text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = read_json_lines(text)
    if not all(isinstance(r, dict) for r in records):
        raise InputError("each line must be a JSON object")
    if not records:
        raise InputError("no JSON objects")
    return pd.DataFrame.from_records(records)


def _as_text(values: pd.Series) -> pd.Series:
    """Cells as text; missing cells (None, NaN) as ""."""
    return values.map(lambda v: "" if v is None or (isinstance(v, float) and v != v) else str(v)).astype(object)

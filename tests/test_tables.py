"""The one table reader (pairs, labels, metadata): formats, ids as text, BOMs, and errors that name the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from vlm.formats.pairs import load_pairs
from vlm.formats.tables import read_table
from vlm.prompts import task_from_classes
from vlm.retrieval.reports import read_metadata
from vlm.zeroshot import read_labels

ROWS = [
    {"slide_id": "001", "report": "lung adenocarcinoma", "label": "LUAD", "patient_id": "07"},
    {"slide_id": "002", "report": "squamous cell carcinoma", "label": "LUSC", "patient_id": "08"},
]


def write(path: Path, rows: list[dict[str, str]] = ROWS) -> Path:
    """The table in the format its suffix names, as spreadsheet programs and pandas users write them."""
    frame = pd.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labels(path: Path) -> object:
    return read_labels(path, task_from_classes(["LUAD", "LUSC"]))[0]


# Every reader of user tables in the project, so each is held to the same rules.
READERS: dict[str, Callable[[Path], object]] = {
    "pairs": load_pairs,
    "zeroshot-labels": labels,
    "metadata": read_metadata,
    "table": read_table,
}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl"])
@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_reads_every_format_with_ids_as_text(tmp_path: Path, suffix: str, reader: str) -> None:
    """Zero-shot labels used to be CSV-only while retrieval read four formats; ids like 001 keep their zeros."""
    result = READERS[reader](write(tmp_path / f"t{suffix}"))
    if reader == "pairs":
        assert result.slide_ids == ["001", "002"] and result.patient_ids == ["07", "08"]
    elif reader == "zeroshot-labels":
        assert result.to_dict() == {"001": "LUAD", "002": "LUSC"}
    else:
        assert result["slide_id"].tolist() == ["001", "002"] and result["patient_id"].tolist() == ["07", "08"]


@pytest.mark.parametrize("reader", sorted(READERS))
def test_utf8_bom_from_a_spreadsheet_export_is_read(tmp_path: Path, reader: str) -> None:
    """Excel's "CSV UTF-8" puts EF BB BF first; without handling it the first column is '\\ufeffslide_id'."""
    path = tmp_path / "t.csv"
    pd.DataFrame(ROWS).to_csv(path, index=False, encoding="utf-8-sig")
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    result = READERS[reader](path)
    ids = result.slide_ids if reader == "pairs" else list(result.index if reader == "zeroshot-labels" else
                                                          result["slide_id"])
    assert ids == ["001", "002"]


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"empty file \(0 bytes\)"),
        (b"slide_id,report,label\n", r"no rows"),
        (b"\xef\xbb\xbfslide_id,report,label\n", r"no rows"),
        (b"slide_id,report\n\xff\xfe,x\n", r"not a readable CSV"),
    ],
    ids=["zero-bytes", "header-only", "bom-header-only", "not-utf8"],
)
def test_damaged_tables_give_one_error_naming_the_file(
    tmp_path: Path, reader: str, content: bytes, message: str
) -> None:
    path = tmp_path / "damaged.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        READERS[reader](path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_missing_file_and_unknown_format_name_the_file(tmp_path: Path, reader: str) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        READERS[reader](tmp_path / "nope.csv")
    (tmp_path / "t.xlsx").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"t\.xlsx: unknown .* format '\.xlsx'"):
        READERS[reader](tmp_path / "t.xlsx")


def test_a_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"slide_id": "a", "report": "x"}\n{"slide_id": "b", "rep\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl: not a readable JSONL pairs table \(line 2 is not JSON"):
        load_pairs(path)


def test_missing_column_lists_what_was_found(tmp_path: Path) -> None:
    path = write(tmp_path / "labels.parquet", [{"slide": "a", "label": "LUAD"}])
    expected = r"labels\.parquet: missing column\(s\) \['slide_id'\]; found \['slide', 'label'\]"
    with pytest.raises(ValueError, match=expected):
        labels(path)


def test_metadata_keeps_numbers_but_not_for_ids(tmp_path: Path) -> None:
    """Metadata columns other than ids keep their types (an age stays a number in the index metadata)."""
    path = write(tmp_path / "meta.csv", [{"slide_id": "0001", "age": 61}, {"slide_id": "0002", "age": 70}])
    frame = read_metadata(path)
    assert frame["slide_id"].tolist() == ["0001", "0002"] and frame["age"].tolist() == [61, 70]


def test_an_id_list_exported_by_a_spreadsheet_is_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A byte-order mark made the first id of `index remove --ids-file` (and of a slide list) unknown."""
    from vlm.cli import main
    from vlm.formats.tables import read_list
    from vlm.wsi.collect import collect_slides

    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"\xef\xbb\xbf001\r\n\r\n# a comment\r\n002\r\n")
    assert read_list(ids) == ["001", "002"]
    (tmp_path / "a.svs").write_bytes(b"")
    slides = tmp_path / "slides.txt"
    slides.write_bytes(b"\xef\xbb\xbfa.svs\n")
    assert collect_slides([slides]) == [tmp_path / "a.svs"]
    assert main(["index", "remove", "--index", str(tmp_path / "ix"), "--ids-file", str(tmp_path / "absent.txt")]) == 2
    assert "absent.txt: no such ids file" in caplog.text
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1\.txt: not a UTF-8 text list file"):
        read_list(tmp_path / "latin1.txt")


NA_LIKE_IDS = ["NA", "null", "None", "nan", "N/A", "NaN", "#N/A"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl"])
@pytest.mark.parametrize("reader", sorted(READERS))
def test_ids_that_look_like_missing_values_stay_ids(tmp_path: Path, suffix: str, reader: str) -> None:
    """pandas reads "NA", "null", "None", "nan" as missing: one such slide silently lost its metadata and
    several were reported as one id "listed more than once"."""
    rows = [{"slide_id": i, "report": f"report {n}", "label": "LUAD", "patient_id": i} for n, i in
            enumerate(NA_LIKE_IDS)]
    result = READERS[reader](write(tmp_path / f"t{suffix}", rows))
    if reader == "pairs":
        assert result.slide_ids == NA_LIKE_IDS and result.patient_ids == NA_LIKE_IDS
    elif reader == "zeroshot-labels":
        assert list(result.index) == NA_LIKE_IDS
    else:
        assert result["slide_id"].tolist() == NA_LIKE_IDS and result["patient_id"].tolist() == NA_LIKE_IDS


def test_metadata_numbers_still_read_na_as_missing(tmp_path: Path) -> None:
    path = tmp_path / "meta.csv"
    path.write_text("slide_id,age\nNA,61\nnull,NA\n")
    frame = read_metadata(path)
    assert frame["slide_id"].tolist() == ["NA", "null"]
    assert frame["age"].iloc[0] == 61 and pd.isna(frame["age"].iloc[1])


def test_jsonl_lines_split_on_newline_only(tmp_path: Path) -> None:
    """JSON Lines ends a record at "\\n" only; U+2028, U+0085 and a lone "\\r" inside strings are text, and a
    file with both "\\r\\n" and "\\n" endings (edited on two systems) reads the same."""
    reports = ["line\u2028separator", "next\u0085line", "carriage\rreturn", "para\u2029graph", "form\x0cfeed"]
    rows = [{"slide_id": f"S{n}", "report": r, "label": "LUAD"} for n, r in enumerate(reports)]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes((lines[0] + "\r\n" + lines[1] + "\n" + lines[2] + "\r\n\r\n" + "\n".join(lines[3:])).encode())
    pairs = load_pairs(path)
    assert pairs.slide_ids == [r["slide_id"] for r in rows] and list(pairs.reports) == reports
    assert read_table(path)["report"].tolist() == reports

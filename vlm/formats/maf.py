"""Mutation Annotation Format (MAF): somatic mutation calls, one row per variant per tumour aliquot.

Read as the GDC writes it (docs.gdc.cancer.gov/Data/File_Formats/MAF_Format; the header lines as
NCI-GDC/gdc-maf-tool `gdc_maf_tool/defer.py` writes them): `#version ...`, `#filedate ...`,
`#annotation.spec ...`, ... lines, then one tab-separated header line and the rows, plain or gzipped.
cBioPortal's `data_mutations*.txt` has the same columns (with or without `#` lines). Three columns matter
here: `Hugo_Symbol` (gene), `Variant_Classification` and `Tumor_Sample_Barcode` (the tumour aliquot).

Mutant means at least one non-silent coding variant: the nine classes of `NON_SILENT`, maftools' default
`vc_nonSyn` (read.maf). Silent, intronic, UTR, flanking, RNA and IGR variants do not count. A case that is
absent from the MAF was not sequenced (or not released): its status is unknown, never wild-type.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from vlm.errors import InputError, MissingInputError

REQUIRED_COLUMNS: tuple[str, ...] = ("Hugo_Symbol", "Variant_Classification", "Tumor_Sample_Barcode")
#: read when present: they tell one variant reported on two rows (two transcripts) from two variants
VARIANT_COLUMNS: tuple[str, ...] = ("Chromosome", "Start_Position", "Reference_Allele", "Tumor_Seq_Allele2")
NON_SILENT: tuple[str, ...] = (
    "Frame_Shift_Del",
    "Frame_Shift_Ins",
    "Splice_Site",
    "Translation_Start_Site",
    "Nonsense_Mutation",
    "Nonstop_Mutation",
    "In_Frame_Del",
    "In_Frame_Ins",
    "Missense_Mutation",
)


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as probe:
        return probe.read(2) == b"\x1f\x8b"


def read_maf(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The three label columns of a MAF (plain or gzipped), as text; one clear error for a file that is not one."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such MAF file")
    try:
        gzipped = _is_gzip(path)
        opened = gzip.open(path, "rt", encoding="utf-8") if gzipped else path.open("r", encoding="utf-8-sig")
        with opened as stream:
            skipped = 0
            header = ""
            properties: dict[str, str] = {}
            for line in stream:
                if line.startswith("#"):
                    key, _, value = line[1:].strip().partition(" ")
                    properties[key] = value.strip()
                    skipped += 1
                    continue
                header = line.rstrip("\r\n")
                break
    except (UnicodeDecodeError, OSError, EOFError) as error:
        raise InputError(f"{path}: not a readable MAF (tab-separated text, plain or gzipped): {error}") from error
    columns = header.split("\t")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if not header or missing:
        found = columns[:8] if header else []
        raise InputError(
            f"{path}: not a MAF with the columns vlm needs: missing {missing or list(REQUIRED_COLUMNS)} (found "
            f"{found}{' …' if len(columns) > 8 else ''}). vlm reads GDC / cBioPortal MAFs: '#' header lines, then "
            "a tab-separated header with Hugo_Symbol, Variant_Classification and Tumor_Sample_Barcode"
        )
    wanted = [*REQUIRED_COLUMNS, *(c for c in VARIANT_COLUMNS if c in columns)]
    frame = pd.read_csv(
        path, sep="\t", skiprows=skipped, usecols=wanted, dtype=str, keep_default_na=False,
        compression="gzip" if gzipped else None, encoding="utf-8-sig", low_memory=False,
    )
    for column in REQUIRED_COLUMNS:
        frame[column] = frame[column].str.strip()
    # GDC MAFs name every tumour aliquot they analysed, including those without a variant that passed
    # masking (`#tumor.aliquots.submitter_id a,b`): sequenced too. (`#tumor.aliquot` holds a UUID: not used.)
    listed = properties.get("tumor.aliquots.submitter_id", "")
    frame.attrs["sequenced_aliquots"] = [a.strip() for a in listed.split(",") if a.strip()]
    frame.attrs["source"] = str(path)
    return frame


def maf_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """MAF files from files and folders (a folder: its *.maf and *.maf.gz, recursively, as gdc-client lays
    out one folder per downloaded file)."""
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith((".maf", ".maf.gz")))
            if not found:
                raise MissingInputError(f"{path}: folder holds no .maf or .maf.gz file")
            files.extend(found)
        else:
            files.append(path)
    if not files:
        raise MissingInputError("no MAF file given")
    return files

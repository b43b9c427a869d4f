"""Labels from public tables, per case, written per slide (`vlm labels`).

Mutations and cancer types belong to a case (or an aliquot of it), not to a slide. `build_labels` decides one
label per case and writes one row per slide of each labelled case of a pairs table, `slide_id, patient_id,
<label column>`, the layout `vlm zeroshot --labels` and `vlm probe --labels` read:

- gene status from a MAF (`vlm.formats.maf`): column = the gene, 1 = at least one non-silent coding variant
  in a tumour aliquot of the case, 0 = the case is in the MAF (sequenced) with no such variant; a case not
  in the MAF is unknown and gets no row (listed in the run report);
- tumour mutational burden from a MAF: non-silent coding variants per megabase of the stated capture size,
  `TMB` = high / low at a threshold (`tmb_high_vs_low` reads it);
- class labels from a case table (`patient_id, cancer_type`, as TCGA-Reports' tcga_patient_to_cancer_type.csv),
  mapped to a prompt task's class codes through the task's `labels.map`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from vlm.errors import InputError, UsageError
from vlm.formats import tcga
from vlm.formats.maf import NON_SILENT, VARIANT_COLUMNS, maf_files, read_maf
from vlm.formats.pairs import load_pairs
from vlm.formats.tables import read_table
from vlm.io import atomic_path, check_output_file

log = logging.getLogger(__name__)

TMB_COLUMN = "TMB"


MafInput = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]  # one MAF, or several files / folders


def _maf_samples(path: MafInput) -> tuple[pd.DataFrame, dict[str, Any]]:
    """MAF rows of tumour aliquots, with a `case` column, from one or more MAF files or folders; aliquots a
    GDC header lists without any row are kept as rows of no gene (sequenced, nothing found)."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    frames = [read_maf(file) for file in maf_files(paths)]
    listed = {a for f in frames for a in f.attrs["sequenced_aliquots"]}
    frame = pd.concat(frames, ignore_index=True)
    silent = sorted(listed - set(frame["Tumor_Sample_Barcode"]))
    if silent:
        empty = {"Hugo_Symbol": "", "Variant_Classification": "", "Tumor_Sample_Barcode": silent}
        frame = pd.concat([frame, pd.DataFrame(empty)], ignore_index=True)
    parsed = [tcga.parse_aliquot(b) for b in frame["Tumor_Sample_Barcode"]]
    frame["case"] = [p[0] if p else b for p, b in zip(parsed, frame["Tumor_Sample_Barcode"], strict=True)]
    tumour = [p is None or tcga.is_tumour_sample(p[1]) for p in parsed]
    normal = sorted({b for b, keep in zip(frame["Tumor_Sample_Barcode"], tumour, strict=True) if not keep})
    empty = frame["Tumor_Sample_Barcode"] == ""
    if empty.any():
        where = ", ".join(_names(path))
        raise InputError(f"{where}: {int(empty.sum())} MAF row(s) with an empty Tumor_Sample_Barcode")
    return frame[tumour].reset_index(drop=True), {"normal_aliquots_ignored": normal}


def gene_status(maf: MafInput, gene: str) -> tuple[dict[str, int], dict[str, Any]]:
    """case -> 1 (mutant) / 0 (wild-type) for every case in the MAF; absent cases are not in the result."""
    frame, notes = _maf_samples(maf)
    if not (frame["Hugo_Symbol"] == gene).any():
        close = sorted({g for g in frame["Hugo_Symbol"].unique() if g.upper() == gene.upper()})
        hint = f" (did you mean {close}?)" if close else ""
        raise InputError(
            f"{', '.join(_names(maf))}: gene {gene!r} has no variant of any class in this MAF{hint}; every case "
            "would be wild-type, which is more likely a wrong symbol (HGNC, as Hugo_Symbol) or MAF than the truth"
        )
    hit = (frame["Hugo_Symbol"] == gene) & frame["Variant_Classification"].isin(NON_SILENT)
    mutant = set(frame.loc[hit, "case"])
    status = {case: int(case in mutant) for case in sorted(set(frame["case"]))}
    notes["mutant_variant_classes"] = list(NON_SILENT)
    return status, notes


def tumour_mutational_burden(
    maf: MafInput, capture_mb: float, threshold: float
) -> tuple[dict[str, str], dict[str, float], dict[str, Any]]:
    """case -> "high"/"low" and case -> mutations per Mb (non-silent coding variants / `capture_mb`).

    Computed per tumour aliquot; a case whose aliquots fall on both sides of the threshold is left out
    (listed as conflicting), since no single label is right for all its slides.
    """
    if not capture_mb or capture_mb <= 0:
        raise UsageError(f"`capture_mb` must be the positive size of the sequenced territory in Mb, got {capture_mb}")
    frame, notes = _maf_samples(maf)
    counted = frame[frame["Variant_Classification"].isin(NON_SILENT)]
    # one variant listed twice for an aliquot (two transcripts) counts once, as maftools' removeDuplicatedVariants
    position = [c for c in VARIANT_COLUMNS if c in counted.columns]
    if len(position) == len(VARIANT_COLUMNS):
        known = counted[position].notna().all(axis=1) & (counted[position] != "").all(axis=1)
        unique = counted[known].drop_duplicates(["Tumor_Sample_Barcode", *position])
        counted = pd.concat([unique, counted[~known]])  # rows without a position are all kept
    per_aliquot = counted.groupby("Tumor_Sample_Barcode").size()
    aliquot_case = dict(zip(frame["Tumor_Sample_Barcode"], frame["case"], strict=True))
    values: dict[str, list[float]] = collections.defaultdict(list)
    for aliquot, case in aliquot_case.items():
        values[case].append(float(per_aliquot.get(aliquot, 0)) / capture_mb)
    labels: dict[str, str] = {}
    burden: dict[str, float] = {}
    conflicting = []
    for case, tmbs in sorted(values.items()):
        calls = {"high" if t >= threshold else "low" for t in tmbs}
        if len(calls) > 1:
            conflicting.append(case)
            continue
        labels[case], burden[case] = calls.pop(), max(tmbs)
    notes.update({"conflicting_aliquots": conflicting, "capture_mb": capture_mb, "threshold_per_mb": threshold,
                  "counted_variant_classes": list(NON_SILENT)})
    return labels, burden, notes


def case_classes(
    cases: str | os.PathLike[str], column: str, task: str | os.PathLike[str] | None = None
) -> tuple[dict[str, str], str, dict[str, Any]]:
    """case -> class from a case table's `column`; mapped to `task`'s class codes when a task is given.

    Returns the labels, the output column name (the task's label column, else `label`) and what was left out.
    """
    frame = read_table(cases, what="case labels", all_text=True)
    id_col = next((c for c in ("patient_id", "case_id") if c in frame.columns), None)
    if id_col is None or column not in frame.columns:
        raise InputError(f"{cases}: a case table needs patient_id (or case_id) and {column!r} columns; found "
                         f"{list(frame.columns)}")
    values: dict[str, set[str]] = collections.defaultdict(set)
    for case, value in zip(frame[id_col], frame[column], strict=True):
        if case.strip() and value.strip():
            values[case.strip()].add(value.strip())
    conflicting = sorted(case for case, found in values.items() if len(found) > 1)
    if conflicting:
        raise InputError(f"{cases}: case(s) with different {column!r} values, e.g. {conflicting[:5]}; one per case")
    raw = {case: next(iter(found)) for case, found in values.items()}
    notes: dict[str, Any] = {}
    if task is None:
        return raw, "label", notes
    from vlm.prompts import load_prompt_task

    prompt_task = load_prompt_task(task)
    mapped = {case: prompt_task.label_to_class(value) for case, value in raw.items()}
    labels = {case: code for case, code in mapped.items() if code is not None}
    unmapped = collections.Counter(raw[case] for case, code in mapped.items() if code is None)
    notes["values_not_in_task"] = dict(unmapped.most_common())
    return labels, prompt_task.label_column or "label", notes


def build_labels(
    pairs: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    maf: MafInput | None = None,
    gene: str | None = None,
    capture_mb: float | None = None,
    tmb_threshold: float = 10.0,
    cases: str | os.PathLike[str] | None = None,
    column: str | None = None,
    task: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write one label row per slide of each labelled case of `pairs`; return the run report (also written
    to `<out stem>_report.json`). Exactly one source: `maf` + `gene`, `maf` + `capture_mb`, or `cases` + `column`."""
    out = check_output_file(out)
    pairs_table = load_pairs(pairs)
    if pairs_table.patient_ids is None:
        raise InputError(f"{pairs}: labels are per case, and this pairs table has no patient_id column (vlm pairs "
                         "writes it)")
    extra: dict[str, dict[str, float]] = {}
    if maf is not None and gene and capture_mb is None and cases is None:
        labels, notes = gene_status(maf, gene)
        label_column, source = gene, {"maf": _names(maf), "gene": gene}
    elif maf is not None and capture_mb is not None and not gene and cases is None:
        labels, burden, notes = tumour_mutational_burden(maf, capture_mb, tmb_threshold)
        label_column, source = TMB_COLUMN, {"maf": _names(maf), "capture_mb": capture_mb, "threshold": tmb_threshold}
        extra["TMB_per_Mb"] = burden
    elif cases is not None and column and maf is None:
        labels, label_column, notes = case_classes(cases, column, task)
        source = {"cases": str(cases), "column": column, "task": None if task is None else str(task)}
    else:
        raise UsageError("give one label source: `maf` FILE `gene` SYMBOL, `maf` FILE `capture_mb` MB (TMB), or "
                         "`cases` TABLE `column` NAME [`task` TASK]")
    rows = []
    unknown: list[str] = []
    normal: list[str] = []
    for slide_id, case in zip(pairs_table.slide_ids, pairs_table.patient_ids, strict=True):
        barcode = tcga.parse_slide_id(slide_id)
        if barcode is not None and barcode.kind == "normal":
            normal.append(slide_id)  # normal tissue does not carry the tumour's mutation or cancer type
        elif case in labels:
            row = {"slide_id": slide_id, "patient_id": case, label_column: labels[case]}
            row.update({name: values[case] for name, values in extra.items()})
            rows.append(row)
        else:
            unknown.append(case)
    unknown_cases = sorted(set(unknown))
    if not rows:
        source = ", ".join(_names(maf)) if maf is not None else cases
        raise InputError(
            f"none of the {len(set(pairs_table.patient_ids))} cases of {pairs} has a label in {source}; check that "
            "both name cases the same way (e.g. TCGA-XX-XXXX)"
        )
    labelled_cases = {row["patient_id"]: row[label_column] for row in rows}
    report = {
        "pairs": str(pairs),
        "source": source,
        "column": label_column,
        "slides_labelled": len(rows),
        "cases_labelled": len(labelled_cases),
        "classes": {str(k): v for k, v in sorted(collections.Counter(labelled_cases.values()).items())},
        "cases_unknown": len(unknown_cases),
        "slides_unknown": len(unknown),
        "normal_slides_not_labelled": len(normal),
        "listed": {
            "cases_unknown": unknown_cases,
            "normal_slides_not_labelled": normal,
            **notes,
        },
    }
    with atomic_path(out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    with atomic_path(out.with_name(f"{out.stem}_report.json")) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    log.info("labels: %d slides of %d cases (%d cases unknown) -> %s", len(rows), len(labelled_cases),
             len(unknown_cases), out)
    return report


def _names(maf: MafInput) -> list[str]:
    return [str(maf)] if isinstance(maf, str | os.PathLike) else [str(m) for m in maf]


def labels_summary(report: dict[str, Any]) -> str:
    classes = ", ".join(f"{k}: {v}" for k, v in report["classes"].items())
    return "\n".join(
        [
            f"{'column':28} {report['column']}",
            f"{'cases labelled':28} {report['cases_labelled']} ({classes})",
            f"{'slides labelled':28} {report['slides_labelled']}",
            f"{'cases unknown (no label)':28} {report['cases_unknown']} ({report['slides_unknown']} slides)",
        ]
    )

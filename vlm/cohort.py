"""Cohorts: from a table of reports and a folder of slides to the pairs table (`vlm pairs`).

A report describes a case; a case has several slides. `build_pairs` matches every slide to its case by a
rule, pairs it with the case's (cleaned) report and writes `slide_id, patient_id, report[, split]`, plus a
run report (`<out stem>_report.json`) that lists everything not paired and why, and the cleaning audit
(`<out stem>_cleaning_audit.csv`). Nothing is dropped without being listed there, id by id.

Matching rules (`match`):
- `tcga`: the case is the 12-character barcode `TCGA-XX-XXXX` of GDC slide names and TCGA-Reports ids
  (`vlm.formats.tcga`); only diagnostic slides of tumour samples unless `slide_types` asks for more, because
  a frozen or normal-tissue slide does not show what the report of the resected tumour describes.
- `table:FILE`: a table with `slide_id` and `patient_id` (or `case_id`) columns; report ids are case ids.
- `regex:PATTERN`: a regular expression with a group named `case` (else the first group), searched in slide
  ids and report ids alike.

Labels for those cases come from public tables through `build_labels` (`vlm labels`).
"""

from __future__ import annotations

import collections
import csv
import json
import logging
import os
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from vlm.errors import InputError, UsageError
from vlm.formats import tcga
from vlm.formats.tables import read_table
from vlm.io import atomic_path, check_output_file, duplicate_ids

log = logging.getLogger(__name__)

REPORT_ID_COLUMNS: tuple[str, ...] = ("patient_filename", "patient_id", "case_id", "report_id")
REPORT_TEXT_COLUMNS: tuple[str, ...] = ("text", "report")
DUPLICATE_POLICIES: tuple[str, ...] = ("refuse", "join")


@dataclass(frozen=True)
class MatchRule:
    """How slide ids and report ids map to case ids; `None` = this id names no case under the rule."""

    name: str
    slide_case: Callable[[str], str | None]
    report_case: Callable[[str], str | None]
    strict: bool  # tcga: an id that is not a barcode is an error, not an unmatched id


def match_rule(spec: str) -> MatchRule:
    """`tcga`, `table:FILE` or `regex:PATTERN` (see the module docstring)."""
    if spec == "tcga":

        def slide_case(slide_id: str) -> str | None:
            barcode = tcga.parse_slide_id(slide_id)
            return barcode.case if barcode else None

        return MatchRule("tcga", slide_case, tcga.case_of_report_id, strict=True)
    if spec.startswith("table:"):
        path = Path(spec[len("table:") :])
        frame = read_table(path, required=("slide_id",), what="slide-to-case", all_text=True)
        column = next((c for c in ("patient_id", "case_id") if c in frame.columns), None)
        if column is None:
            raise InputError(f"{path}: a slide-to-case table needs slide_id and patient_id (or case_id) columns; "
                             f"found {list(frame.columns)}")
        repeated = duplicate_ids(frame["slide_id"].str.strip())
        if repeated:
            raise InputError(f"{path}: slide id(s) listed more than once, e.g. {repeated[:5]}; one case per slide")
        table = {s.strip(): c.strip() for s, c in zip(frame["slide_id"], frame[column], strict=True) if c.strip()}
        return MatchRule(spec, table.get, lambda report_id: report_id.strip() or None, strict=False)
    if spec.startswith("regex:"):
        text = spec[len("regex:") :]
        try:
            pattern = re.compile(text)
        except re.error as error:
            raise UsageError(f"`match` regex:{text}: not a valid regular expression ({error})") from error
        if pattern.groups == 0:
            raise UsageError(f"`match` regex:{text}: needs a group, named 'case' or the first, that captures the case")

        def case_of(value: str) -> str | None:
            found = pattern.search(value)
            if found is None:
                return None
            case = found.group("case") if "case" in pattern.groupindex else found.group(1)
            return case or None

        return MatchRule(spec, case_of, case_of, strict=False)
    raise UsageError(f"unknown `match` rule {spec!r}; use tcga, table:FILE or regex:PATTERN")


def slide_ids_from(
    features: str | os.PathLike[str] | None = None,
    slides: str | os.PathLike[str] | None = None,
    embeddings: str | os.PathLike[str] | None = None,
) -> tuple[list[str], str]:
    """The slide ids of exactly one source: a folder of feature files, of slide files, or a slide-embeddings
    parquet; and the source's name for messages."""
    given = [(name, value) for name, value in (("--features", features), ("--slides", slides),
                                               ("--embeddings", embeddings)) if value is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of `features` (a folder), `slides` (a folder) or `embeddings` (a parquet)")
    flag, value = given[0]
    if flag == "--features":
        from vlm.formats.features import feature_files

        ids = [file.stem for file in feature_files(value)]
    elif flag == "--slides":
        from vlm.io import slide_id_from_path
        from vlm.wsi.collect import collect_slides

        ids = [slide_id_from_path(path) for path in collect_slides([value])]
    else:
        from vlm.formats.embeddings import read_slide_embeddings

        ids = [str(s) for s in read_slide_embeddings(value)["slide_id"]]
    repeated = duplicate_ids(ids)
    if repeated:
        raise InputError(f"{value}: slide id(s) found more than once, e.g. {repeated[:5]}; one file per slide")
    return ids, str(value)


def _pick_column(frame: pd.DataFrame, given: str | None, candidates: Sequence[str], what: str, flag: str,
                 path: Path) -> str:
    if given is not None:
        if given not in frame.columns:
            raise InputError(f"{path}: no column {given!r} ({flag}); found {list(frame.columns)}")
        return given
    for column in candidates:
        if column in frame.columns:
            return column
    raise InputError(
        f"{path}: no {what} column: expected one of {list(candidates)} (TCGA-Reports has patient_filename and "
        f"text), found {list(frame.columns)}; name yours with {flag}"
    )


def read_reports(
    path: str | os.PathLike[str],
    rule: MatchRule,
    id_column: str | None = None,
    text_column: str | None = None,
    duplicates: str = "refuse",
) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
    """case -> report text, case -> split (when the table has a `split` column), and what was left out."""
    path = Path(path)
    if duplicates not in DUPLICATE_POLICIES:
        raise UsageError(f"`duplicate_reports` must be one of {DUPLICATE_POLICIES}, got {duplicates!r}")
    frame = read_table(path, what="reports", all_text=True)
    id_col = _pick_column(frame, id_column, REPORT_ID_COLUMNS, "report id", "`report_id_column`", path)
    text_col = _pick_column(frame, text_column, REPORT_TEXT_COLUMNS, "report text", "`report_text_column`", path)
    texts: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    unmatched: list[str] = []
    empty: list[str] = []
    for row, (report_id, text) in enumerate(zip(frame[id_col], frame[text_col], strict=True), start=2):
        report_id = report_id.strip()
        case = rule.report_case(report_id) if report_id else None
        if case is None:
            if rule.strict:
                raise InputError(
                    f"{path}: row {row}: report id {report_id!r} in {id_col!r} is not a TCGA case barcode "
                    "(TCGA-XX-XXXX, optionally .<uuid> as TCGA-Reports' patient_filename); fix the id or use "
                    "`match` table:FILE / regex:PATTERN"
                )
            unmatched.append(report_id or f"(row {row}: empty id)")
            continue
        if not text.strip():
            empty.append(case)
            continue
        texts.setdefault(case, []).append(text)
        split = frame["split"].iloc[row - 2].strip().lower() if "split" in frame.columns else ""
        if split and splits.setdefault(case, split) != split:
            raise InputError(f"{path}: row {row}: case {case} is in split {splits[case]!r} on an earlier row and "
                             f"{split!r} here; a case belongs to one split")
    conflicting = sorted(case for case, items in texts.items() if len(set(items)) > 1)
    if conflicting and duplicates == "refuse":
        raise InputError(
            f"{path}: {len(conflicting)} case(s) have several report rows with different text, e.g. "
            f"{conflicting[:5]}; keep one row per case, or pass `duplicate_reports` join to join them in file order"
        )
    reports = {case: "\n".join(dict.fromkeys(items)) for case, items in texts.items()}
    repeated = sorted(case for case, items in texts.items() if len(items) > 1)
    left_out = {"unmatched_report_ids": unmatched, "empty_reports": empty,
                "cases_with_several_report_rows": repeated, "joined_cases": conflicting}
    return reports, splits, left_out


def build_pairs(
    reports: str | os.PathLike[str],
    slide_ids: Sequence[str],
    out: str | os.PathLike[str],
    match: str = "tcga",
    *,
    slide_types: Sequence[str] = tcga.DEFAULT_SLIDE_TYPES,
    clean: bool = True,
    clean_rules: str | os.PathLike[str] | None = None,
    text_encoder: str | os.PathLike[str] | None = None,
    max_length: int | None = None,
    report_id_column: str | None = None,
    report_text_column: str | None = None,
    duplicate_reports: str = "refuse",
    slide_source: str = "slides",
) -> dict[str, Any]:
    """Pair each slide with its case's report; write `out` (CSV), its run report and cleaning audit.

    Returns the run report (also written to `<out stem>_report.json`). `text_encoder` names the tokenizer
    whose token counts are reported against `max_length` (None: no token counts).
    """
    from vlm.report_cleaning import clean_report, load_cleaning_rules
    from vlm.settings import DEFAULT_MAX_LENGTH

    out = check_output_file(out)
    unknown = sorted(set(slide_types) - set(tcga.SLIDE_TYPES))
    if unknown or not slide_types:
        raise UsageError(f"`slide_types` {unknown or '(none)'}: choose from {', '.join(tcga.SLIDE_TYPES)}")
    rule = match_rule(match)
    case_reports, splits, left_out = read_reports(reports, rule, report_id_column, report_text_column,
                                                  duplicate_reports)

    audit_rows: list[Any] = []
    emptied: list[str] = []
    rules = load_cleaning_rules(clean_rules) if clean else None
    if rules is not None:
        for case in sorted(case_reports):
            text, audit = clean_report(case_reports[case], rules, report_id=case)
            audit_rows.extend(audit)
            if text:
                case_reports[case] = text
            else:
                emptied.append(case)
                del case_reports[case]

    slide_cases: dict[str, str] = {}
    excluded: dict[str, list[str]] = collections.defaultdict(list)
    unmatched_slides: list[str] = []
    not_barcodes: list[str] = []
    for slide_id in slide_ids:
        case = rule.slide_case(slide_id)
        if case is None:
            (not_barcodes if rule.strict else unmatched_slides).append(slide_id)
            continue
        if rule.name == "tcga":
            kind = tcga.parse_slide_id(slide_id).kind  # type: ignore[union-attr]
            if kind not in slide_types:
                excluded[kind].append(slide_id)
                continue
        slide_cases[slide_id] = case
    if not_barcodes:
        raise InputError(
            f"{len(not_barcodes)} slide id(s) in {slide_source} are not GDC slide names "
            f"(TCGA-XX-XXXX-01Z-00-DX1[.<uuid>]), e.g. {not_barcodes[:5]}; rename them or use `match` table:FILE"
        )

    rows = [(slide, case) for slide, case in slide_cases.items() if case in case_reports]
    rows.sort(key=lambda item: (item[1], item[0]))
    slides_without_report = sorted(slide for slide, case in slide_cases.items() if case not in case_reports)
    paired_cases = {case for _, case in rows}
    reports_without_slide = sorted(set(case_reports) - paired_cases)
    if not rows:
        raise InputError(
            f"no slide of {slide_source} matched a report of {reports} under `match` {match} (slides "
            f"{len(slide_ids)}, reports {len(case_reports)}, e.g. slide {list(slide_ids)[:1]} and case "
            f"{sorted(case_reports)[:1]}); check the rule and the slide types ({', '.join(slide_types)})"
        )

    tokens = _token_counts(case_reports, paired_cases, text_encoder, max_length or DEFAULT_MAX_LENGTH)
    per_case = collections.Counter(case for _, case in rows)
    report: dict[str, Any] = {
        "reports": str(reports),
        "slides": slide_source,
        "match": match,
        "slide_types": list(slide_types),
        "cleaning": None
        if rules is None
        else {"rules": rules.source, "removed": len(audit_rows), "audit": _audit_path(out).name},
        "counts": {
            "report_cases": len(case_reports) + len(emptied),
            "slides": len(slide_ids),
            "pairs": len(rows),
            "cases_paired": len(paired_cases),
            "reports_without_slide": len(reports_without_slide),
            "slides_without_report": len(slides_without_report),
            "slides_without_case": len(unmatched_slides),
            "slides_excluded_by_type": {kind: len(ids) for kind, ids in sorted(excluded.items())},
            "unmatched_report_ids": len(left_out["unmatched_report_ids"]),
            "empty_reports": len(left_out["empty_reports"]),
            "reports_emptied_by_cleaning": len(emptied),
        },
        "slides_per_case": {str(k): v for k, v in sorted(collections.Counter(per_case.values()).items())},
        "tokens": tokens,
        "listed": {
            "reports_without_slide": reports_without_slide,
            "slides_without_report": slides_without_report,
            "slides_without_case": unmatched_slides,
            "slides_excluded_by_type": {kind: ids for kind, ids in sorted(excluded.items())},
            "unmatched_report_ids": left_out["unmatched_report_ids"],
            "empty_reports": left_out["empty_reports"],
            "reports_emptied_by_cleaning": emptied,
            "cases_with_several_report_rows": left_out["cases_with_several_report_rows"],
            "joined_cases": left_out["joined_cases"],
        },
    }
    frame = pd.DataFrame({"slide_id": [s for s, _ in rows], "patient_id": [c for _, c in rows],
                          "report": [case_reports[c] for _, c in rows]})
    if splits:
        frame["split"] = [splits.get(case, "") for _, case in rows]
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    with atomic_path(_report_path(out)) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    if rules is not None:
        with atomic_path(_audit_path(out)) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["patient_id", "line", "scope", "rule", "removed"])
            writer.writerows((a.report_id, a.line, a.scope, a.rule, a.removed) for a in audit_rows)
    log.info("pairs: %d slides of %d cases -> %s", len(rows), len(paired_cases), out)
    return report


def _report_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_report.json")


def _audit_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_cleaning_audit.csv")


def _token_counts(
    reports: dict[str, str], cases: set[str], text_encoder: str | os.PathLike[str] | None, max_length: int
) -> dict[str, Any] | None:
    """Tokens per paired report (special tokens included) and how many exceed `max_length` and get cut."""
    if text_encoder is None:
        return None
    from vlm.encoders.text import load_tokenizer
    from vlm.hub import WeightsUnavailable

    try:
        tokenizer = load_tokenizer(text_encoder)
    except WeightsUnavailable as error:  # the pairs need no tokenizer: say how to go without the counts
        raise WeightsUnavailable(f"{error} Or pair without token counts: `vlm pairs --no-token-count`.") from error
    texts = [reports[case] for case in sorted(cases)]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]]
    return {
        "text_encoder": str(text_encoder),
        "max_length": max_length,
        "min": min(lengths),
        "median": float(statistics.median(lengths)),
        "max": max(lengths),
        "truncated": sum(n > max_length for n in lengths),
    }


def summary_table(report: dict[str, Any]) -> str:
    """The run report as the few lines `vlm pairs` prints."""
    counts = report["counts"]
    lines = [
        f"{'reports (cases)':32} {counts['report_cases']}",
        f"{'slides':32} {counts['slides']}",
        f"{'pairs (slides paired)':32} {counts['pairs']}",
        f"{'cases paired':32} {counts['cases_paired']}",
        f"{'reports without a slide':32} {counts['reports_without_slide']}",
        f"{'slides without a report':32} {counts['slides_without_report']}",
        f"{'slides matching no case':32} {counts['slides_without_case']}",
    ]
    for kind, n in counts["slides_excluded_by_type"].items():
        lines.append(f"{'slides excluded: ' + kind:32} {n}  (--slide-types {kind} to pair them)")
    for key in ("unmatched_report_ids", "empty_reports", "reports_emptied_by_cleaning"):
        if counts[key]:
            lines.append(f"{key.replace('_', ' '):32} {counts[key]}")
    per_case = ", ".join(f"{k}: {v}" for k, v in report["slides_per_case"].items())
    lines.append(f"{'slides per case (cases)':32} {per_case}")
    if report["cleaning"]:
        lines.append(f"{'cleaning: removed lines/spans':32} {report['cleaning']['removed']}  "
                     f"(audit: {report['cleaning']['audit']})")
    tokens = report["tokens"]
    if tokens:
        lines.append(f"{'tokens per report':32} min {tokens['min']}, median {tokens['median']:g}, max {tokens['max']}")
        lines.append(f"{'truncated at --max-length ' + str(tokens['max_length']):32} {tokens['truncated']}")
    return "\n".join(lines)

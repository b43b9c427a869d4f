"""Subcommands `vlm pairs` (reports + slides -> pairs table) and `vlm labels` (public tables -> labels)."""

from __future__ import annotations

import argparse

_PAIRS_EPILOG = """examples:
  vlm pairs --reports TCGA_Reports.csv --features trident/20x_256px_0px_overlap/features_conch_v15 \\
      --match tcga --out cohort/pairs.csv
  vlm pairs --reports reports.csv --slides /data/slides --match table:slide_to_case.csv --out pairs.csv
  vlm pairs --reports reports.csv --embeddings runs/slides.parquet --match 'regex:^(?P<case>P\\d+)_' \\
      --out pairs.csv

assumes: one row per case in --reports (an id column: patient_filename, patient_id, case_id or report_id;
a text column: text or report); slide ids are file names without extension. Writes OUT, OUT_report.json
(every id left out and why) and, when cleaning, OUT_cleaning_audit.csv (every removed line with its rule).
"""

_LABELS_EPILOG = """examples:
  vlm labels --maf TCGA-LUAD.masked.maf.gz --gene EGFR --pairs cohort/pairs.csv --out cohort/egfr.csv
  vlm labels --maf TCGA-LUAD.masked.maf.gz --capture-mb <Mb your assay covers> --pairs cohort/pairs.csv \\
      --out cohort/tmb.csv
  vlm labels --cases tcga_patient_to_cancer_type.csv --column cancer_type --task nsclc_subtyping \\
      --pairs cohort/pairs.csv --out cohort/subtype.csv

assumes: the pairs table has patient_id (vlm pairs writes it); MAF rows are tumour aliquots whose
Tumor_Sample_Barcode starts with the case id (TCGA) or equals it. A case absent from the MAF is unknown and
gets no row. Writes OUT (slide_id, patient_id, label column) and OUT_report.json.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from vlm.formats.tcga import DEFAULT_SLIDE_TYPES, SLIDE_TYPES
    from vlm.settings import DEFAULT_MAX_LENGTH, DEFAULT_TEXT_ENCODER

    p = subparsers.add_parser(
        "pairs", help="pair slides with their case's report (TCGA names, a table or a regex) into a pairs table",
        epilog=_PAIRS_EPILOG,
    )
    p.add_argument("--reports", required=True, metavar="TABLE", help="reports table (CSV/TSV/Parquet/JSONL), e.g. "
                   "TCGA-Reports' TCGA_Reports.csv (patient_filename, text)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", metavar="DIR", help="folder of <slide_id>.h5 tile-feature files (vlm, TRIDENT)")
    source.add_argument("--slides", metavar="DIR", help="folder of slide files (.svs, .tif, ...)")
    source.add_argument("--embeddings", metavar="PARQUET", help="slide embeddings written by vlm embed-slides")
    p.add_argument("--match", required=True, metavar="RULE",
                   help="how ids name cases: tcga (TCGA-XX-XXXX barcodes), table:FILE (slide_id, patient_id), or "
                   "regex:PATTERN (group 'case', searched in slide and report ids)")
    p.add_argument("--out", required=True, metavar="CSV", help="pairs table to write (slide_id, patient_id, report)")
    p.add_argument("--slide-types", nargs="+", choices=SLIDE_TYPES, default=list(DEFAULT_SLIDE_TYPES),
                   help="TCGA slides to pair: diagnostic (DX, tumour), frozen (TS/BS/MS, tumour), normal (sample "
                   "types 10-19); a normal slide never matches a tumour report, so ask for it knowingly")
    p.add_argument("--no-clean", action="store_true", help="keep the report text as it is (no cleaning)")
    p.add_argument("--clean-rules", metavar="YAML", help="cleaning rules file (default: vlm's shipped "
                   "report_cleaning.yaml; copy and edit it)")
    p.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER,
                   help="hub id or folder whose tokenizer counts tokens per report")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                   help="tokens per report the text model keeps (vlm train --max-length)")
    p.add_argument("--no-token-count", action="store_true", help="skip counting tokens (no tokenizer needed)")
    p.add_argument("--report-id-column", help="id column of --reports (default: the first of patient_filename, "
                   "patient_id, case_id, report_id)")
    p.add_argument("--report-text-column", help="text column of --reports (default: text, else report)")
    p.add_argument("--duplicate-reports", choices=("refuse", "join"), default="refuse",
                   help="several rows of one case with different text: refuse, or join them in file order")
    p.set_defaults(func=run_pairs)

    q = subparsers.add_parser(
        "labels", help="labels per slide from public tables: gene status or TMB from a MAF, classes from a case table",
        epilog=_LABELS_EPILOG,
    )
    q.add_argument("--pairs", required=True, metavar="CSV", help="pairs table with patient_id (from vlm pairs)")
    q.add_argument("--out", required=True, metavar="CSV", help="labels table to write")
    q.add_argument("--maf", nargs="+", metavar="FILE",
                   help="MAF file(s) or folder(s) of them (GDC masked somatic mutation files as gdc-client "
                   "downloads them, or cBioPortal's data_mutations.txt), plain or .gz")
    q.add_argument("--gene", metavar="SYMBOL", help="gene (Hugo_Symbol) whose status is the label: 1 = any "
                   "non-silent coding variant, 0 = sequenced without one")
    q.add_argument("--capture-mb", type=float, metavar="MB", help="TMB: size of the sequenced territory in Mb "
                   "(your assay's; no default); labels TMB high/low")
    q.add_argument("--tmb-threshold", type=float, default=10.0, help="TMB-high cut, non-silent mutations per Mb")
    q.add_argument("--cases", metavar="TABLE", help="case table (patient_id and a class column)")
    q.add_argument("--column", help="class column of --cases (e.g. cancer_type)")
    q.add_argument("--task", help="prompt task (shipped name or YAML) whose label map turns values into classes")
    q.set_defaults(func=run_labels)


def run_pairs(args: argparse.Namespace) -> int:
    from vlm.cohort import build_pairs, slide_ids_from, summary_table

    slide_ids, source = slide_ids_from(args.features, args.slides, args.embeddings)
    report = build_pairs(
        args.reports, slide_ids, args.out, args.match,
        slide_types=args.slide_types, clean=not args.no_clean, clean_rules=args.clean_rules,
        text_encoder=None if args.no_token_count else args.text_encoder, max_length=args.max_length,
        report_id_column=args.report_id_column, report_text_column=args.report_text_column,
        duplicate_reports=args.duplicate_reports, slide_source=source,
    )
    print(summary_table(report))
    print(f"pairs -> {args.out}")
    return 0


def run_labels(args: argparse.Namespace) -> int:
    from vlm.labels import build_labels, labels_summary

    report = build_labels(
        args.pairs, args.out, maf=args.maf, gene=args.gene, capture_mb=args.capture_mb,
        tmb_threshold=args.tmb_threshold, cases=args.cases, column=args.column, task=args.task,
    )
    print(labels_summary(report))
    print(f"labels -> {args.out}")
    return 0

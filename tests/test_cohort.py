"""`vlm pairs` and `vlm labels` on files laid out as their peers write them.

Reports: TCGA-Reports' TCGA_Reports.csv (`tests/support/peers.py:write_tcga_reports_csv`); slides: TRIDENT
feature files named as GDC names slide files (`<slide barcode>.<uuid>.h5`); mutations: a GDC masked somatic
MAF with its '#' header lines, gzipped (`write_gdc_maf`); case labels: TCGA-Reports'
data/tcga_metadata/tcga_patient_to_cancer_type.csv layout (`patient_id,cancer_type`).
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.support.peers import trident_grid, write_gdc_maf, write_tcga_reports_csv, write_trident_features
from vlm.cli import main
from vlm.formats.pairs import load_pairs

A, B, C, D = "TCGA-05-4244", "TCGA-22-5471", "TCGA-38-4625", "TCGA-49-6742"
UUIDS = [f"{i:08x}-38cf-40ea-8213-45c2b100ac0{i}" for i in range(1, 10)]
SLIDES = {
    f"{A}-01Z-00-DX1.{UUIDS[0]}": A,
    f"{A}-01Z-00-DX2.{UUIDS[1]}": A,
    f"{A}-01A-01-TS1.{UUIDS[2]}": A,  # frozen section of the tumour
    f"{A}-11A-01-TS1.{UUIDS[3]}": A,  # normal tissue
    f"{B}-01Z-00-DX1.{UUIDS[4]}": B,
    f"{D}-01Z-00-DX1.{UUIDS[5]}": D,  # no report
}
DIAGNOSIS_A = "Lung, left upper lobe, lobectomy: invasive adenocarcinoma, acinar predominant, 3.2 cm"
DIAGNOSIS_B = "Lung, right lower lobe, lobectomy: squamous cell carcinoma, keratinizing, 4.1 cm"


def _features(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    coords = trident_grid(2, 3, level0_magnification=40)
    for name in names:
        write_trident_features(folder / f"{name}.h5", coords, rng.standard_normal((len(coords), 8)), 40)
    return folder


def _reports(path: Path) -> Path:
    return write_tcga_reports_csv(path, {
        f"{A}.{UUIDS[6]}": ["SURGICAL PATHOLOGY REPORT", f"{DIAGNOSIS_A}", f"Received fresh labeled {A}-01A",
                            "Page 1 of 1"],
        f"{B}.{UUIDS[7]}": [DIAGNOSIS_B, "Margins free of tumor"],
        f"{C}.{UUIDS[8]}": ["Kidney, nephrectomy: clear cell renal cell carcinoma"],
    })


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.models import build_tiny_text_encoder

    return build_tiny_text_encoder(tmp_path_factory.mktemp("text"))


@pytest.fixture()
def cohort(tmp_path: Path, tiny_text: Path) -> dict[str, Path]:
    return {
        "features": _features(tmp_path / "features", list(SLIDES)),
        "reports": _reports(tmp_path / "TCGA_Reports.csv"),
        "text": tiny_text,
        "out": tmp_path / "cohort",
    }


def _pairs_args(cohort: dict[str, Path], out: str = "pairs.csv") -> list[str]:
    return ["pairs", "--reports", str(cohort["reports"]), "--features", str(cohort["features"]), "--match", "tcga",
            "--out", str(cohort["out"] / out), "--text-encoder", str(cohort["text"])]


def _pairs(cohort: dict[str, Path], *extra: str, out: str = "pairs.csv") -> tuple[int, Path]:
    target = cohort["out"] / out
    code = main(["pairs", "--reports", str(cohort["reports"]), "--features", str(cohort["features"]), "--match",
                 "tcga", "--out", str(target), "--text-encoder", str(cohort["text"]), *extra])
    return code, target


def test_pairs_tcga_pairs_diagnostic_slides_with_their_case_report(cohort: dict[str, Path], capsys) -> None:
    code, out = _pairs(cohort, "--max-length", "512")
    assert code == 0
    pairs = load_pairs(out)
    assert pairs.slide_ids == sorted(s for s, c in SLIDES.items() if c in (A, B) and "-DX" in s)
    assert pairs.patient_ids == [A, A, B]
    assert pairs.reports[0] == pairs.reports[1]  # one report per case, on each of its slides
    assert DIAGNOSIS_A in pairs.reports[0] and DIAGNOSIS_B in pairs.reports[2]
    assert A not in pairs.reports[0] and "Page 1 of 1" not in pairs.reports[0]  # cleaned: barcode, page number

    report = json.loads((out.parent / "pairs_report.json").read_text())
    assert report["counts"]["pairs"] == 3 and report["counts"]["cases_paired"] == 2
    assert report["listed"]["reports_without_slide"] == [C]
    assert report["listed"]["slides_without_report"] == [s for s, c in SLIDES.items() if c == D]
    assert report["listed"]["slides_excluded_by_type"] == {
        "frozen": [f"{A}-01A-01-TS1.{UUIDS[2]}"],
        "normal": [f"{A}-11A-01-TS1.{UUIDS[3]}"],
    }
    assert report["slides_per_case"] == {"1": 1, "2": 1}
    assert report["tokens"]["truncated"] == 0 and report["tokens"]["max"] <= 512
    printed = capsys.readouterr().out
    assert "slides excluded: normal" in printed and "truncated at --max-length 512" in printed

    code, short = _pairs(cohort, "--max-length", "8", out="short.csv")
    assert code == 0
    assert json.loads((short.parent / "short_report.json").read_text())["tokens"]["truncated"] == 2


def test_pairs_slide_types_on_request(cohort: dict[str, Path]) -> None:
    code, out = _pairs(cohort, "--slide-types", "diagnostic", "frozen", "normal", "--no-token-count")
    assert code == 0
    assert sorted(load_pairs(out).slide_ids) == sorted(s for s, c in SLIDES.items() if c in (A, B))


def test_cleaning_audit_lists_every_removed_line_and_keeps_the_diagnosis(tmp_path: Path) -> None:
    report = "\n".join([
        "SURGICAL PATHOLOGY REPORT", "Patient Name: DOE, JANE", "MRN: 12345678", "DOB: 01/02/1950",
        "Accession #: S11-12345", "Page 1 of 2", "FINAL DIAGNOSIS:", "Lung, left upper lobe: invasive adeno-",
        "carcinoma,   acinar predominant.", "Received fresh on 03/04/2011.", "Printed by: jsmith",
        "*** End of Report ***",
    ])
    reports = tmp_path / "reports.csv"
    pd.DataFrame({"case_id": ["P1"], "report": [report]}).to_csv(reports, index=False)
    slides = _features(tmp_path / "features", ["P1_slide1"])
    out = tmp_path / "pairs.csv"
    args = ["pairs", "--reports", str(reports), "--features", str(slides), "--match", "regex:^(?P<case>P\\d+)",
            "--no-token-count", "--out", str(out)]
    assert main(args) == 0
    text = load_pairs(out).reports[0]
    assert text.splitlines() == ["SURGICAL PATHOLOGY REPORT", "FINAL DIAGNOSIS:",
                                 "Lung, left upper lobe: invasive adenocarcinoma, acinar predominant.",
                                 "Received fresh on."]
    with (tmp_path / "pairs_cleaning_audit.csv").open() as handle:
        audit = list(csv.DictReader(handle))
    removed = {(row["rule"], row["removed"]) for row in audit}
    assert removed == {
        ("patient_line", "Patient Name: DOE, JANE"), ("mrn", "MRN: 12345678"), ("dob", "DOB: 01/02/1950"),
        ("accession", "Accession #: S11-12345"), ("page_number", "Page 1 of 2"), ("date", "03/04/2011"),
        ("printed_by", "Printed by: jsmith"), ("end_of_report", "*** End of Report ***"),
        ("dehyphenate", "adeno-<line break>carcinoma"),
    }
    assert all(row["patient_id"] == "P1" for row in audit)

    assert main([*args[:-1], str(tmp_path / "raw.csv"), "--no-clean"]) == 0
    assert load_pairs(tmp_path / "raw.csv").reports[0] == report
    assert not (tmp_path / "raw_cleaning_audit.csv").exists()


def test_a_report_on_one_line_is_never_removed_whole() -> None:
    from vlm.report_cleaning import clean_report, load_cleaning_rules

    # "Patient: ..." would match the whole-line rule patient_line: only the line-length guard keeps it
    one_line = f"Patient: lung, lobectomy: {DIAGNOSIS_A}. {A}-01A. Page 1 of 2. Date: 01/02/2003."
    text, audit = clean_report(one_line, load_cleaning_rules(), "x")
    assert DIAGNOSIS_A in text and A not in text and "Page 1" not in text and "01/02/2003" not in text
    assert {entry.scope for entry in audit} == {"span"}


def test_cleaning_rules_are_data(tmp_path: Path) -> None:
    from vlm.report_cleaning import clean_report, load_cleaning_rules

    rules = tmp_path / "rules.yaml"
    rules.write_text("line_rules:\n  site: 'hospital\\s+x'\n")
    text, audit = clean_report("Hospital X\nDiagnosis: benign.", load_cleaning_rules(rules), "r1")
    assert text == "Diagnosis: benign." and audit[0].rule == "site"
    rules.write_text("line_rules:\n  broken: '(unclosed'\n")
    with pytest.raises(ValueError, match=r"line_rules\.broken: not a valid regular expression"):
        load_cleaning_rules(rules)


def _code_and_error(args: list[str], caplog) -> tuple[int, str]:
    caplog.clear()
    code = main(args)
    return code, " ".join(record.getMessage() for record in caplog.records)


def test_pairs_bad_input_gets_one_clear_error(cohort: dict[str, Path], tmp_path: Path, caplog) -> None:
    base = ["pairs", "--features", str(cohort["features"]), "--match", "tcga", "--no-token-count"]
    out = tmp_path / "bad" / "pairs.csv"
    out.parent.mkdir()

    no_columns = tmp_path / "no_columns.csv"
    pd.DataFrame({"case": [A], "body": ["text"]}).to_csv(no_columns, index=False)
    code, error = _code_and_error([*base, "--reports", str(no_columns), "--out", str(out)], caplog)
    assert code == 2 and "no report id column" in error and "patient_filename" in error

    not_barcode = tmp_path / "not_barcode.csv"
    write_tcga_reports_csv(not_barcode, {"TCGA-05-42": ["text"]})
    code, error = _code_and_error([*base, "--reports", str(not_barcode), "--out", str(out)], caplog)
    assert code == 2 and "row 2" in error and "'TCGA-05-42'" in error and "not a TCGA case barcode" in error

    twice = tmp_path / "twice.csv"
    pd.DataFrame({"patient_filename": [f"{A}.{UUIDS[0]}", f"{A}.{UUIDS[1]}"],
                  "text": ["Addendum: EGFR exon 19 deletion.", DIAGNOSIS_A]}).to_csv(twice, index=False)
    code, error = _code_and_error([*base, "--reports", str(twice), "--out", str(out)], caplog)
    assert code == 2 and "different text" in error and A in error and "--duplicate-reports join" in error
    assert not out.exists()
    assert main([*base, "--reports", str(twice), "--out", str(out), "--duplicate-reports", "join"]) == 0
    assert load_pairs(out).reports[0] == f"Addendum: EGFR exon 19 deletion.\n{DIAGNOSIS_A}"  # file order

    foreign = _features(tmp_path / "foreign", ["slide_001"])
    code, error = _code_and_error(
        [
            "pairs",
            "--features",
            str(foreign),
            "--match",
            "tcga",
            "--no-token-count",
            "--reports",
            str(cohort["reports"]),
            "--out",
            str(tmp_path / "x.csv"),
        ],
        caplog,
    )
    assert code == 2 and "not GDC slide names" in error and "slide_001" in error


def test_pairs_keep_the_split_of_the_reports_table(cohort: dict[str, Path], caplog) -> None:
    reports = pd.read_csv(cohort["reports"])
    reports["split"] = ["train", "test", "val"]
    reports.to_csv(cohort["reports"], index=False)
    code, out = _pairs(cohort, "--no-token-count")
    assert code == 0
    pairs = load_pairs(out)
    assert dict(zip(pairs.patient_ids, pairs.splits, strict=True)) == {A: "train", B: "test"}
    twice = pd.concat([reports, reports.iloc[[0]].assign(split="test")])  # same report, another split
    twice.to_csv(cohort["reports"], index=False)
    code, error = _code_and_error([*_pairs_args(cohort), "--no-token-count"], caplog)
    assert code == 2 and "one split" in error and A in error


def test_pairs_table_rule(cohort: dict[str, Path], tmp_path: Path) -> None:
    table = tmp_path / "slide_to_case.csv"
    pd.DataFrame({"slide_id": ["s1", "s2", "s3"], "patient_id": ["H1", "H1", "H2"]}).to_csv(table, index=False)
    reports = tmp_path / "reports.csv"
    pd.DataFrame({"patient_id": ["H1", "H2"], "text": ["Colon: adenocarcinoma.", "Colon: tubular adenoma."]}).to_csv(
        reports, index=False)
    out = tmp_path / "pairs.csv"
    args = ["pairs", "--reports", str(reports), "--features", str(_features(tmp_path / "f", ["s1", "s2", "s3", "s4"])),
            "--match", f"table:{table}", "--no-token-count", "--out", str(out)]
    assert main(args) == 0
    pairs = load_pairs(out)
    assert list(zip(pairs.slide_ids, pairs.patient_ids, strict=True)) == [("s1", "H1"), ("s2", "H1"), ("s3", "H2")]
    assert json.loads((tmp_path / "pairs_report.json").read_text())["listed"]["slides_without_case"] == ["s4"]


# ---------------------------------------------------------------------------------------------- labels


@pytest.fixture()
def pairs_csv(cohort: dict[str, Path]) -> Path:
    code, out = _pairs(cohort, "--slide-types", "diagnostic", "--no-token-count")
    assert code == 0
    return out


def _maf(path: Path) -> Path:
    return write_gdc_maf(path, [
        ("EGFR", "Missense_Mutation", f"{A}-01A-11D-A000-08"),
        ("TP53", "Nonsense_Mutation", f"{A}-01A-11D-A000-08"),
        ("KRAS", "Frame_Shift_Del", f"{A}-01A-11D-A000-08"),
        ("EGFR", "Silent", f"{B}-01A-11D-A000-08"),  # silent: not mutant
        ("EGFR", "Intron", f"{B}-01A-11D-A000-08"),
        ("EGFR", "Missense_Mutation", f"{B}-11A-01D-A000-08"),  # a normal aliquot: ignored
        ("TP53", "Missense_Mutation", f"{B}-01A-11D-A000-08"),
    ])


def test_labels_gene_status_from_a_gdc_maf(pairs_csv: Path, tmp_path: Path) -> None:
    from vlm.prompts import load_prompt_task
    from vlm.zeroshot import read_labels

    # a case of the pairs that the MAF does not hold: unknown, no row (not wild-type)
    pairs = pd.read_csv(pairs_csv)
    extra = pd.DataFrame({"slide_id": [f"{C}-01Z-00-DX1"], "patient_id": [C], "report": ["Kidney."]})
    pd.concat([pairs, extra]).to_csv(pairs_csv, index=False)

    out = tmp_path / "egfr.csv"
    assert main(["labels", "--maf", str(_maf(tmp_path / "luad.maf.gz")), "--gene", "EGFR", "--pairs",
                 str(pairs_csv), "--out", str(out)]) == 0
    labels = pd.read_csv(out, dtype=str)
    assert list(labels.columns) == ["slide_id", "patient_id", "EGFR"]
    assert dict(zip(labels["slide_id"], labels["EGFR"], strict=True)) == {
        s: {A: "1", B: "0"}[c] for s, c in SLIDES.items() if c in (A, B) and "-DX" in s
    }
    report = json.loads((tmp_path / "egfr_report.json").read_text())
    assert report["listed"]["cases_unknown"] == [C] and report["classes"] == {"0": 1, "1": 1}
    assert report["listed"]["normal_aliquots_ignored"] == [f"{B}-11A-01D-A000-08"]
    raw, column = read_labels(out, load_prompt_task("luad_egfr_mutation"))  # the shipped task reads it
    assert column == "EGFR" and set(raw) == {"1", "0"}


def test_labels_leave_normal_slides_unlabelled(cohort: dict[str, Path], tmp_path: Path) -> None:
    """A normal-tissue slide paired on request does not carry its case's tumour mutation."""
    code, pairs = _pairs(cohort, "--slide-types", "diagnostic", "normal", "--no-token-count")
    assert code == 0
    out = tmp_path / "egfr.csv"
    assert main(["labels", "--maf", str(_maf(tmp_path / "m.maf.gz")), "--gene", "EGFR", "--pairs", str(pairs),
                 "--out", str(out)]) == 0
    normal = f"{A}-11A-01-TS1.{UUIDS[3]}"
    assert normal in set(pd.read_csv(pairs)["slide_id"]) and normal not in set(pd.read_csv(out)["slide_id"])
    assert json.loads((tmp_path / "egfr_report.json").read_text())["listed"]["normal_slides_not_labelled"] == [normal]


def test_labels_tmb_and_case_classes(pairs_csv: Path, tmp_path: Path) -> None:
    from vlm.prompts import load_prompt_task

    maf = _maf(tmp_path / "luad.maf.gz")
    out = tmp_path / "tmb.csv"
    assert main(["labels", "--maf", str(maf), "--capture-mb", "0.2", "--pairs", str(pairs_csv), "--out",
                 str(out)]) == 0  # A: 3 non-silent / 0.2 Mb = 15 (high); B: 1 / 0.2 = 5 (low)
    labels = pd.read_csv(out).drop_duplicates("patient_id").set_index("patient_id")
    assert labels.loc[A, "TMB"] == "high" and labels.loc[B, "TMB"] == "low"
    assert labels.loc[A, "TMB_per_Mb"] == pytest.approx(15.0) and labels.loc[B, "TMB_per_Mb"] == pytest.approx(5.0)
    # one variant on two rows (two transcripts) counts once: A stays at 15 per Mb
    lines = gzip.open(maf, "rt").read().splitlines()
    duplicated = tmp_path / "duplicated.maf.gz"
    with gzip.open(duplicated, "wt") as handle:
        handle.write("\n".join([*lines, lines[6]]) + "\n")
    assert main(["labels", "--maf", str(duplicated), "--capture-mb", "0.2", "--pairs", str(pairs_csv), "--out",
                 str(tmp_path / "tmb2.csv")]) == 0
    assert pd.read_csv(tmp_path / "tmb2.csv").set_index("patient_id").loc[A, "TMB_per_Mb"].max() == pytest.approx(15.0)
    tmb_task = load_prompt_task("tmb_high_vs_low")  # the shipped task reads the column and its values
    assert tmb_task.label_column == "TMB" and {tmb_task.label_to_class(v) for v in labels["TMB"]} == {"high", "low"}

    cases = tmp_path / "tcga_patient_to_cancer_type.csv"
    pd.DataFrame({"patient_id": [A, B, C], "cancer_type": ["LUAD", "LUSC", "KIRC"]}).to_csv(cases, index=False)
    out = tmp_path / "subtype.csv"
    assert main(["labels", "--cases", str(cases), "--column", "cancer_type", "--task", "nsclc_subtyping",
                 "--pairs", str(pairs_csv), "--out", str(out)]) == 0
    labels = pd.read_csv(out).drop_duplicates("patient_id").set_index("patient_id")
    assert labels["label"].to_dict() == {A: "LUAD", B: "LUSC"}


def test_labels_bad_maf_gets_one_clear_error(pairs_csv: Path, tmp_path: Path, caplog) -> None:
    columns = tuple(c for c in __import__("tests.support.peers", fromlist=["x"]).GDC_MAF_COLUMNS
                    if c != "Tumor_Sample_Barcode")
    no_barcode = write_gdc_maf(tmp_path / "no_barcode.maf.gz", [("EGFR", "Missense_Mutation", f"{A}-01A")], columns)
    out = tmp_path / "labels.csv"
    code, error = _code_and_error(["labels", "--maf", str(no_barcode), "--gene", "EGFR", "--pairs", str(pairs_csv),
                                   "--out", str(out)], caplog)
    assert code == 2 and "Tumor_Sample_Barcode" in error and "no_barcode.maf.gz" in error
    assert not out.exists()
    code, error = _code_and_error(["labels", "--maf", str(_maf(tmp_path / "m.maf.gz")), "--gene", "egfr",
                                   "--pairs", str(pairs_csv), "--out", str(out)], caplog)
    assert code == 2 and "did you mean ['EGFR']" in error
    code, error = _code_and_error(["labels", "--maf", str(tmp_path / "m.maf.gz"), "--capture-mb", "0",
                                   "--pairs", str(pairs_csv), "--out", str(out)], caplog)
    assert code == 2 and "--capture-mb" in error


def test_pairs_from_slide_files_and_from_slide_embeddings(tmp_path: Path, slide_05: Path) -> None:
    """The other two slide sources give the same slide ids: slide file names, an embed-slides parquet."""
    from vlm.formats.embeddings import write_slide_embeddings

    reports = _reports(tmp_path / "TCGA_Reports.csv")
    names = [s for s, c in SLIDES.items() if c == B] + [s for s, c in SLIDES.items() if c == D]
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in names:
        (folder / f"{name}{slide_05.suffix}").symlink_to(slide_05)
    parquet = tmp_path / "slides.parquet"
    rows = [{"slide_id": n, "embedding": [0.0] * 4, "n_tiles": 1, "encoder": "tiny", "pool": "mean"} for n in names]
    write_slide_embeddings(parquet, rows, {"pool": "mean"})
    for flag, source in (("--slides", folder), ("--embeddings", parquet)):
        out = tmp_path / f"{flag[2:]}.csv"
        args = ["pairs", "--reports", str(reports), flag, str(source), "--match", "tcga", "--no-token-count"]
        assert main([*args, "--out", str(out)]) == 0
        assert load_pairs(out).slide_ids == [names[0]]  # B's slide; D has no report


def test_labels_from_a_cbioportal_maf(pairs_csv: Path, tmp_path: Path) -> None:
    """cBioPortal's data_mutations.txt: plain text, `#version 2.4`, sample barcodes without vial (TCGA-..-01)."""
    maf = tmp_path / "data_mutations.txt"
    rows = [("Hugo_Symbol", "Variant_Classification", "Tumor_Sample_Barcode"),
            ("KRAS", "Missense_Mutation", f"{B}-01"), ("TP53", "Silent", f"{A}-01")]
    maf.write_text("#version 2.4\n" + "".join("\t".join(row) + "\n" for row in rows))
    out = tmp_path / "kras.csv"
    assert main(["labels", "--maf", str(maf), "--gene", "KRAS", "--pairs", str(pairs_csv), "--out", str(out)]) == 0
    labels = pd.read_csv(out).drop_duplicates("patient_id").set_index("patient_id")
    assert labels["KRAS"].to_dict() == {A: 0, B: 1}


def test_labels_from_a_folder_of_gdc_mafs_counts_analysed_aliquots_without_rows(
    pairs_csv: Path, tmp_path: Path
) -> None:
    """gdc-client puts each file in a folder named by its UUID; an aliquot the header lists without any
    variant row was sequenced: wild-type, not unknown."""
    download = tmp_path / "maf"
    for index, (variants, quiet) in enumerate(
        [([("EGFR", "In_Frame_Del", f"{A}-01A-11D-A000-08")], ()), ([], (f"{B}-01A-11D-A000-08",))]
    ):
        (download / UUIDS[index]).mkdir(parents=True)
        write_gdc_maf(download / UUIDS[index] / f"part{index}.wxs.maf.gz", variants, without_variants=quiet)
    out = tmp_path / "egfr.csv"
    assert main(["labels", "--maf", str(download), "--gene", "EGFR", "--pairs", str(pairs_csv), "--out", str(out)]) == 0
    labels = pd.read_csv(out).drop_duplicates("patient_id").set_index("patient_id")
    assert labels["EGFR"].to_dict() == {A: 1, B: 0}


def test_pairs_without_the_tokenizer_fail_before_writing_and_say_how_to_skip_counts(
    cohort: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = cohort["out"] / "pairs.csv"
    args = ["pairs", "--reports", str(cohort["reports"]), "--features", str(cohort["features"]), "--match", "tcga",
            "--text-encoder", "vlm-tests/no-such-tokenizer", "--out", str(out)]
    code, error = _code_and_error(args, caplog)
    assert code == 1 and "--no-token-count" in error and not out.exists()


@pytest.mark.parametrize(
    ("name", "case", "kind"),
    [
        ("TCGA-05-4244-01Z-00-DX1.d4ff32cd-38cf-40ea-8213-45c2b100ac01", "TCGA-05-4244", "diagnostic"),
        ("TCGA-06-0174-01Z-00-DX10.9FDC2626-C1DC-4B4F-9452-6ADB2F6397FB", "TCGA-06-0174", "diagnostic"),
        ("TCGA-A8-A0A7-01Z-00-DX1", "TCGA-A8-A0A7", "diagnostic"),
        ("TCGA-BH-A0H7-01A-01-MSA", "TCGA-BH-A0H7", "frozen"),
        ("TCGA-AG-A01N-01A-02-BS2", "TCGA-AG-A01N", "frozen"),
        ("TCGA-CH-5761-11A-01-TS1", "TCGA-CH-5761", "normal"),
        ("TCGA-05-4244", None, None),  # a case, not a slide
        ("TCGA-05-4244-01Z-00-DX1.not-a-uuid", None, None),
        ("BLGSP-71-06-00076-01A-01-S2-HE", None, None),
    ],
)
def test_gdc_slide_names(name: str, case: str | None, kind: str | None) -> None:
    """Slide names as the GDC serves them (DX diagnostic, TS/BS/MS frozen sections, sample types 10-19 normal)."""
    from vlm.formats.tcga import parse_slide_id

    barcode = parse_slide_id(name)
    assert (barcode.case, barcode.kind) == (case, kind) if case else barcode is None

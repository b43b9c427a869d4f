"""The "Reproduce on TCGA" recipe of the docs, end to end on files in the upstream layouts, offline.

TCGA-Reports' CSV (`patient_filename`, `text`), TRIDENT feature files named as the GDC names slides
(`<slide barcode>.<uuid>.h5`, written by `tests/support/peers.py:write_trident_features` the way TRIDENT's
`save_h5` writes them), a gzipped GDC MAF with its '#' header lines and TCGA-Reports' case table
(`patient_id,cancer_type`): `vlm pairs` -> `vlm embed-slides` -> `vlm train` -> `vlm labels` ->
`vlm zeroshot` (subtyping and a mutation task) -> `vlm eval retrieval`, with tiny random models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.support.peers import trident_grid, write_gdc_maf, write_tcga_reports_csv, write_trident_features
from vlm.cli import main

LUAD = ["TCGA-05-4244", "TCGA-05-4249", "TCGA-44-2655", "TCGA-49-4487", "TCGA-50-5931", "TCGA-55-6981"]
LUSC = ["TCGA-18-3406", "TCGA-22-5471", "TCGA-33-4587", "TCGA-37-3789", "TCGA-43-6143", "TCGA-56-7222"]
WORDS = {"LUAD": "adenocarcinoma with acinar and lepidic growth", "LUSC": "squamous cell carcinoma, keratinizing"}


def _uuid(i: int) -> str:
    return f"{i:08x}-1b2c-4d3e-8f4a-5b6c7d8e9f{i % 100:02d}"


def _cohort(root: Path) -> dict[str, Path]:
    """Files as a user has them after the downloads of the recipe."""
    rng = np.random.default_rng(0)
    features = root / "trident" / "20x_256px_0px_overlap" / "features_conch_v15"
    features.mkdir(parents=True)
    reports, cases, variants = {}, [], []
    for index, case in enumerate(LUAD + LUSC):
        kind = "LUAD" if case in LUAD else "LUSC"
        slides = [f"{case}-01Z-00-DX1.{_uuid(index)}"]
        if index % 3 == 0:
            slides.append(f"{case}-01Z-00-DX2.{_uuid(100 + index)}")
        if index % 4 == 0:
            slides.append(f"{case}-11A-01-TS1.{_uuid(200 + index)}")  # normal tissue: left out by default
        coords = trident_grid(3, 4, level0_magnification=40)
        for slide in slides:
            shift = 1.0 if kind == "LUAD" else -1.0
            write_trident_features(features / f"{slide}.h5", coords, rng.standard_normal((len(coords), 32)) + shift, 40)
        reports[f"{case}.{_uuid(300 + index)}"] = [
            f"Lung lobectomy: {WORDS[kind]}", f"Received fresh labeled {case}-01A", "Page 1 of 1"
        ]
        cases.append({"patient_id": case, "cancer_type": kind})
        aliquot = f"{case}-01A-11D-A000-08"
        variants.append(("EGFR", "Missense_Mutation" if index % 2 == 0 else "Silent", aliquot))
        variants.append(("TP53", "Nonsense_Mutation", aliquot))
    paths = {
        "features": features,
        "reports": write_tcga_reports_csv(root / "TCGA_Reports.csv", reports),
        "maf": write_gdc_maf(root / "TCGA-LUAD.masked.maf.gz", variants),
        "cases": root / "tcga_patient_to_cancer_type.csv",
    }
    pd.DataFrame(cases).to_csv(paths["cases"], index=False)
    return paths


@pytest.mark.slow
def test_reproduce_on_tcga_recipe_runs_offline(tmp_path: Path) -> None:
    from tests.support.models import build_tiny_text_encoder

    files = _cohort(tmp_path / "download")
    text = build_tiny_text_encoder(tmp_path / "text")
    out = tmp_path / "cohort"
    out.mkdir()

    assert main(["pairs", "--reports", str(files["reports"]), "--features", str(files["features"]), "--match", "tcga",
                 "--text-encoder", str(text), "--max-length", "64", "--out", str(out / "pairs.csv")]) == 0
    pairs = pd.read_csv(out / "pairs.csv")
    assert set(pairs["patient_id"]) == set(LUAD + LUSC) and not pairs["slide_id"].str.contains("-11A-").any()
    assert not pairs["report"].str.contains("TCGA-").any()  # barcodes cleaned out of the text

    assert main(["embed-slides", str(files["features"]), "--out", str(out / "slides.parquet"), "--slide-encoder",
                 "tiny", "--random-weights", "--device", "cpu", "--no-progress"]) == 0
    assert main(["train", "--pairs", str(out / "pairs.csv"), "--embeddings", str(out / "slides.parquet"),
                 "--out", str(out / "align"), "--text-encoder", str(text), "--max-length", "64", "--proj-dim", "8",
                 "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--no-progress"]) == 0

    assert main(["labels", "--cases", str(files["cases"]), "--column", "cancer_type", "--task", "nsclc_subtyping",
                 "--pairs", str(out / "pairs.csv"), "--out", str(out / "subtype.csv")]) == 0
    assert main(["labels", "--maf", str(files["maf"]), "--gene", "EGFR", "--pairs", str(out / "pairs.csv"),
                 "--out", str(out / "egfr.csv")]) == 0

    for task, labels in (("nsclc_subtyping", "subtype.csv"), ("luad_egfr_mutation", "egfr.csv")):
        run = out / f"zeroshot_{task}"
        assert main(["zeroshot", "--model", str(out / "align" / "model"), "--embeddings", str(out / "slides.parquet"),
                     "--task", task, "--labels", str(out / labels), "--level", "case", "--n-boot", "20",
                     "--out", str(run), "--no-progress"]) == 0
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["n_evaluated"] == len(LUAD + LUSC)  # one prediction per case, not per slide
        predictions = pd.read_csv(run / "predictions.csv")
        assert sorted(predictions["patient_id"]) == sorted(LUAD + LUSC)
        assert math.isfinite(metrics["metrics"]["auroc"]["value"] if "auroc" in metrics["metrics"] else
                             metrics["metrics"]["balanced_accuracy"]["value"])

    assert main(["eval", "retrieval", "--model", str(out / "align" / "model"), "--pairs", str(out / "pairs.csv"),
                 "--embeddings", str(out / "slides.parquet"), "--labels", str(out / "subtype.csv"), "--n-boot", "20",
                 "--out", str(out / "retrieval.json")]) == 0
    assert json.loads((out / "retrieval.json").read_text())

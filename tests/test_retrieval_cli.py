"""`vlm index build|build-reports|add|remove`, `vlm search`, `vlm eval retrieval` end to end with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest

from tests.support.models import build_tiny_model
from vlm.cli import main

DIAGNOSES = ("adenocarcinoma", "squamous cell carcinoma", "benign")


def write_slides(path: Path, slide_ids: list[str], seed: int = 0) -> Path:
    """A `vlm embed-slides`-shaped parquet of random 64-d embeddings."""
    rng = np.random.default_rng(seed)
    pd.DataFrame({
        "slide_id": slide_ids, "embedding": [rng.normal(size=64).tolist() for _ in slide_ids],
        "n_tiles": 100, "encoder": "tiny", "pool": "mean",
    }).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("retrieval-cli")
    slide_ids = [f"TCGA-{i:02d}" for i in range(30)]
    build_tiny_model(root / "tiny", slide_embed_dim=64, proj_dim=32).save_pretrained(root / "model")
    build_tiny_model(root / "other", slide_embed_dim=64, proj_dim=16).save_pretrained(root / "other-model")
    labels = [DIAGNOSES[i % 3] for i in range(30)]
    pd.DataFrame({"slide_id": slide_ids, "site": ["lung"] * 30}).to_csv(root / "meta.csv", index=False)
    pd.DataFrame({"slide_id": slide_ids, "label": labels}).to_csv(root / "labels.csv", index=False)
    pd.DataFrame({"slide_id": slide_ids, "report": [f"{label} of the lung" for label in labels]}).to_csv(
        root / "reports.csv", index=False
    )
    return {
        "root": root, "model": root / "model", "other": root / "other-model", "meta": root / "meta.csv",
        "labels": root / "labels.csv", "pairs": root / "reports.csv",
        "slides": write_slides(root / "slides.parquet", slide_ids),
        "new": write_slides(root / "new.parquet", ["NEW-1", "NEW-2"], seed=1),
    }


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, object]]:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_build_then_search_by_text_and_slide(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    index = files["root"] / "index"
    assert main(["index", "build", "--model", str(files["model"]), "--embeddings", str(files["slides"]),
                 "--out", str(index), "--metadata", str(files["meta"])]) == 0
    assert {p.name for p in index.iterdir() if not p.name.startswith(".vlm")} == {
        "index.faiss",
        "metadata.parquet",
        "manifest.json",
    }
    assert "30 slides, flat" in capsys.readouterr().out

    assert main(["search", "--index", str(index), "poorly differentiated squamous cell carcinoma", "-k", "4"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "slide_id", "score", "site"] and len(table) == 5

    hits = run_json(capsys, "search", "--index", str(index), "adenocarcinoma", "-k", "5")  # model from manifest
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all({"rank", "slide_id", "score", "site"} <= set(h) for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    similar = run_json(capsys, "search", "--index", str(index), "--slide-id", "TCGA-03", "-k", "3")
    assert len(similar) == 3 and "TCGA-03" not in {h["slide_id"] for h in similar}


def test_add_remove_and_errors(files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                               caplog: pytest.LogCaptureFixture) -> None:
    index = files["root"] / "edited"
    assert main(["index", "build", "--model", str(files["model"]), "--embeddings", str(files["slides"]),
                 "--out", str(index), "--kind", "hnsw"]) == 0
    assert main(["index", "add", "--index", str(index), "--embeddings", str(files["new"])]) == 0
    assert main(["index", "add", "--index", str(index), "--embeddings", str(files["new"])]) == 2
    assert "already in the index" in caplog.text
    assert main(["index", "remove", "--index", str(index), "TCGA-00", "NEW-1"]) == 0
    assert json.loads((index / "manifest.json").read_text())["count"] == 30
    found = run_json(capsys, "search", "--index", str(index), "--slide-id", "NEW-2", "-k", "29")
    assert not {"TCGA-00", "NEW-1", "NEW-2"} & {h["slide_id"] for h in found}

    caplog.clear()
    assert main(["index", "remove", "--index", str(index), "NOT-THERE"]) == 2
    assert "unknown slide_id" in caplog.text
    assert main(["search", "--index", str(index), "--slide-id", "NOT-THERE"]) == 2
    assert main(["search", "--index", str(index), "text", "--slide-id", "NEW-2"]) == 2
    caplog.clear()
    assert main(["search", "--index", str(index), "carcinoma", "--model", str(files["other"])]) == 2
    assert "digest" in caplog.text
    if not hasattr(faiss, "StandardGpuResources"):
        caplog.clear()
        assert main(["search", "--index", str(index), "carcinoma", "--gpu"]) == 2
        assert "faiss-gpu" in caplog.text


def test_report_index_slide_to_report(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    index = files["root"] / "report-index"
    assert main(["index", "build-reports", "--model", str(files["model"]), "--pairs", str(files["pairs"]),
                 "--out", str(index)]) == 0
    hits = run_json(capsys, "search", "--index", str(index), "--slide-id", "TCGA-05", "--embeddings",
                    str(files["slides"]), "-k", "5")
    assert len(hits) == 5 and all({"rank", "report_id", "slide_id", "score", "report"} <= set(h) for h in hits)
    assert main(["search", "--index", str(index), "--slide-id", "TCGA-05"]) == 2  # needs --slides
    by_text = run_json(capsys, "search", "--index", str(index), "benign", "-k", "2")
    assert by_text[0]["report"].endswith("of the lung")


def test_eval_retrieval(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = files["root"] / "metrics.json"
    assert main(["eval", "retrieval", "--model", str(files["model"]), "--pairs", str(files["pairs"]),
                 "--embeddings", str(files["slides"]), "--labels", str(files["labels"]), "--n-boot", "100",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "report_to_slide" in printed and "MVAcc@5" in printed
    metrics = json.loads(out.read_text())
    assert metrics["split"] == "all" and metrics["n_pairs"] == 30
    for group, name in (("report_to_slide", "R@1"), ("slide_to_report", "R@10"), ("slide_to_slide", "mAP@5")):
        value = metrics[group][name]
        assert 0 <= value["ci_low"] <= value["value"] <= value["ci_high"] <= 1
    assert 0 <= metrics["mean_recall"]["value"] <= 1


def test_metadata_ids_that_look_missing_keep_their_rows(files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path) -> None:
    """Slides named NA, null, None, nan: pandas read their metadata ids as missing, so the build said
    "listed more than once" (one such id silently lost its metadata)."""
    ids = ["NA", "null", "None", "nan", "TCGA-01"]
    slides = write_slides(tmp_path / "slides.parquet", ids, seed=2)
    (tmp_path / "meta.csv").write_text("slide_id,site\n" + "".join(f"{i},site-{i}\n" for i in ids))
    assert main(["index", "build", "--model", str(files["model"]), "--embeddings", str(slides), "--out",
                 str(tmp_path / "index"), "--metadata", str(tmp_path / "meta.csv")]) == 0
    hits = run_json(capsys, "search", "--index", str(tmp_path / "index"), "adenocarcinoma", "-k", "5")
    assert {h["slide_id"]: h["site"] for h in hits} == {i: f"site-{i}" for i in ids}

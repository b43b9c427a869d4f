"""Retrieval: exact search vs NumPy, ANN recall, a trained model's text queries, persistence, edits, errors."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
import torch

from tests.support.models import build_tiny_model, build_tiny_text_encoder
from tests.support.synthetic import clustered_embeddings, write_synthetic
from vlm.formats.embeddings import load_slide_embeddings
from vlm.formats.pairs import load_pairs
from vlm.metrics import first_relevant_rank, label_retrieval
from vlm.model.clip import SlideTextModel
from vlm.retrieval import ReportIndex, SlideIndex, build_slide_index
from vlm.retrieval.evaluate import evaluate_retrieval
from vlm.retrieval.kinds import choose_kind
from vlm.training.config import TrainConfig
from vlm.training.loop import train


@functools.cache
def trained_run(base: Path) -> tuple[Path, Path, Path]:
    """Pairs, slide embeddings and a tiny model trained on them (once per session, shared with the CLI tests).

    48 pairs "<grade> grade <diagnosis>" whose slide embedding is the sum of a diagnosis and a grade
    prototype: text and slide share information only through what training aligns.
    """
    root = base / "retrieval-run"
    root.mkdir(exist_ok=True)
    pairs, embeddings = write_synthetic(root)
    text = build_tiny_text_encoder(root / "text")
    model = train(TrainConfig(pairs=str(pairs), out=str(root / "run"), embeddings=str(embeddings),
                              text_encoder=str(text), max_length=16, proj_dim=16, epochs=20, batch_size=12,
                              lr=1e-2, seed=0))
    return pairs, embeddings, model.model_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return trained_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SlideTextModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), slide_embed_dim=64, proj_dim=32)


def embeddings(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def ids(n: int, prefix: str = "s") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_flat_search_equals_numpy_brute_force(tiny: SlideTextModel) -> None:
    x = embeddings(200)
    index = SlideIndex.build(tiny, x, ids(200))
    assert index.kind == "flat" and index.manifest["recall"]["exact"]
    with torch.no_grad():
        vectors = tiny.encode_slide_embeddings(torch.from_numpy(x)).numpy()
    queries = tiny.encode_text(["carcinoma", "benign tissue", "necrosis"]).numpy()
    expected_ids = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :7]
    scores, found = index.search_vectors(queries, 7)
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, expected_ids, 1), atol=1e-5)
    table = index.search_text(["carcinoma", "benign tissue", "necrosis"], k=7)
    assert table["slide_id"].tolist() == [f"s{i}" for i in expected_ids.ravel()]
    assert table["rank"].tolist() == list(range(1, 8)) * 3


def test_slide_query_excludes_itself_and_reads_back_its_vector(tiny: SlideTextModel) -> None:
    x = embeddings(50)
    x[7] = x[3] + 1e-3  # a near-duplicate of s3
    index = SlideIndex.build(tiny, x, ids(50))
    result = index.search_slide("s3", k=5)
    assert "s3" not in set(result["slide_id"]) and result["slide_id"].iloc[0] == "s7"
    assert index.search_slide("s3", k=5, include_self=True)["slide_id"].iloc[0] == "s3"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_ann_kinds_reach_target_recall(kind: str, tmp_path: Path) -> None:
    faiss.omp_set_num_threads(2)
    model = build_tiny_model(tmp_path, slide_embed_dim=8, proj_dim=32)
    x = clustered_embeddings(51_000, 32, n_clusters=200, intrinsic_dim=8, seed=0)
    queries, base = x[:1000], x[1000:]  # held out: never indexed nor used in tuning
    index = SlideIndex.from_vectors(base, ids(len(base)), model, kind=kind, target_recall=0.95)
    assert index.kind == kind and index.manifest["recall"]["reached"]
    assert index.manifest["recall"]["measured"] >= 0.95
    _, exact = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search_vectors(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact, strict=True)])
    assert recall >= 0.93  # the held-out queries see about what tuning measured
    index.remove([f"s{found[0, 0]}"])  # removed items (tombstones in these kinds) are never returned
    _, again = index.search_vectors(queries[:1], 10)
    assert found[0, 0] not in again[0] and found[0, 1] in again[0]


def test_auto_kind_thresholds() -> None:
    assert [choose_kind(n) for n in (10, 100_000, 100_001, 4_000_000, 4_000_001)] == [
        "flat", "flat", "ivf", "ivf", "ivfpq"
    ]


@pytest.mark.slow
def test_text_query_retrieves_paired_slides_of_trained_model(run: tuple[Path, Path, Path]) -> None:
    pairs_file, slides_file, model_dir = run
    index = build_slide_index(model_dir, slides_file)
    pairs = load_pairs(pairs_file)
    results = index.search_text(pairs.reports, k=5)
    hits = [pairs.slide_ids[q] in set(group["slide_id"]) for q, group in results.groupby("query")]
    chance = 5 / len(index)
    assert np.mean(hits) > 3 * chance, f"R@5 {np.mean(hits):.2f} vs chance {chance:.2f}"
    untrained = SlideIndex.build(build_tiny_model(model_dir.parent / "untrained", slide_embed_dim=16, proj_dim=16),
                                 load_slide_embeddings(slides_file).embeddings, index.keys)
    base = untrained.search_text(pairs.reports, k=5)
    base_hits = [pairs.slide_ids[q] in set(group["slide_id"]) for q, group in base.groupby("query")]
    assert np.mean(hits) > np.mean(base_hits)

    reports = ReportIndex.build_reports(model_dir, pairs)
    found = reports.search_slide(pairs.slide_ids, load_slide_embeddings(slides_file), k=5)
    report_hits = [pairs.slide_ids[q] in set(group["slide_id"]) for q, group in found.groupby("query")]
    assert np.mean(report_hits) > 3 * chance
    assert {"report_id", "slide_id", "report", "score"} <= set(found.columns)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip_add_remove(kind: str, tiny: SlideTextModel, tmp_path: Path) -> None:
    x = embeddings(300)
    meta = pd.DataFrame({"slide_id": ids(300), "site": ["lung", "colon", "breast"] * 100})
    index = SlideIndex.build(tiny, x, ids(300), meta, kind=kind)
    before = index.search_slide(["s1", "s2"], k=5)
    index.save(tmp_path / "index")
    assert {p.name for p in (tmp_path / "index").iterdir() if not p.name.startswith(".vlm")} == {
        "index.faiss",
        "metadata.parquet",
        "manifest.json",
    }
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["count"] == 300 and manifest["dim"] == 32 and manifest["kind"] == kind
    assert manifest["model"]["digest"] == tiny.config.digest() and "vlm_version" in manifest
    loaded = SlideIndex.load(tmp_path / "index", model=tiny)
    pd.testing.assert_frame_equal(loaded.search_slide(["s1", "s2"], k=5), before)
    assert loaded.search_text("x", k=3)["site"].notna().all()

    top = before["slide_id"].iloc[0]
    loaded.remove([top, "s9"])
    loaded.add(x[[1]] * 1.01, ["copy-of-s1"], pd.DataFrame({"slide_id": ["copy-of-s1"], "site": ["skin"]}))
    loaded.save(tmp_path / "index")
    again = SlideIndex.load(tmp_path / "index", model=tiny)
    assert len(again) == 299 and again.manifest["next_id"] == 301
    hits = again.search_slide("s1", k=299)
    assert top not in set(hits["slide_id"]) and "s9" not in set(hits["slide_id"])
    assert hits["slide_id"].iloc[0] == "copy-of-s1" and hits["site"].iloc[0] == "skin"
    if kind != "hnsw":  # a graph search need not reach every node
        assert len(hits) == 298  # everything but the query itself and the removed


def test_every_error_case(tiny: SlideTextModel, tmp_path: Path) -> None:
    x = embeddings(40)
    index = SlideIndex.build(tiny, x, ids(40))
    with pytest.raises(ValueError, match="unknown slide_id"):
        index.remove(["s1", "nope"])
    assert len(index) == 40  # nothing removed
    with pytest.raises(ValueError, match="unknown slide_id"):
        index.search_slide("nope")
    with pytest.raises(ValueError, match="already in the index"):
        index.add(x[:2], ["s1", "new"])
    with pytest.raises(ValueError, match="duplicate slide_id"):
        index.add(x[:2], ["new", "new"])
    with pytest.raises(ValueError, match="duplicate slide_id"):
        SlideIndex.build(tiny, x[:2], ["a", "a"])
    with pytest.raises(ValueError, match="empty collection"):
        SlideIndex.build(tiny, np.zeros((0, 64), np.float32), [])
    with pytest.raises(ValueError, match="unknown index kind 'ivfflat'; choose one of auto, flat"):
        SlideIndex.build(tiny, x, ids(40), kind="ivfflat")
    with pytest.raises(ValueError, match="dimension mismatch"):
        index.add_vectors(np.ones((1, 16), np.float32), ["new"])
    with pytest.raises(ValueError, match="64-d"):
        index.add(np.ones((1, 10), np.float32), ["new"])  # unprojected width the model does not take
    with pytest.raises(ValueError, match="ivfpq needs at least"):
        SlideIndex.build(tiny, x, ids(40), kind="ivfpq")
    index.save(tmp_path / "index")
    other = build_tiny_model(tmp_path / "other", slide_embed_dim=64, proj_dim=16)
    with pytest.raises(ValueError, match="config digest"):
        SlideIndex.load(tmp_path / "index", model=other)
    retrained = copy.deepcopy(tiny)  # same architecture, other weights: same digest, another space
    with torch.no_grad():
        next(retrained.slide_proj.parameters()).add_(0.1)
    with pytest.raises(ValueError, match="projection weights"):
        SlideIndex.load(tmp_path / "index", model=retrained)
    with pytest.raises(ValueError, match="load it with SlideIndex"):
        ReportIndex.load(tmp_path / "index")
    with pytest.raises(FileNotFoundError, match="not an index folder"):
        SlideIndex.load(tmp_path)
    with pytest.raises(ValueError, match="does not record its model"):
        SlideIndex.load(tmp_path / "index").search_text("carcinoma")  # built from an object, no folder
    index.remove(ids(40))
    with pytest.raises(ValueError, match="index is empty"):
        index.search_text("carcinoma")


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources"), reason="this faiss has GPU support")
def test_gpu_without_faiss_gpu_is_a_clear_error(tiny: SlideTextModel) -> None:
    index = SlideIndex.build(tiny, embeddings(20), ids(20))
    with pytest.raises(ImportError, match="faiss-gpu"):
        SlideIndex(index.index, index.metadata, index.manifest, gpu=True)


def test_label_retrieval_metrics_by_hand() -> None:
    neighbours = np.array([["a", "b", "b", "a"], ["b", "a", "c", "c"]])
    scores = label_retrieval(neighbours, np.array(["a", "c"]), np.array([2, 3]), k=4)
    np.testing.assert_allclose(scores["Acc@4"], [1, 1])
    np.testing.assert_allclose(scores["MVAcc@4"], [1, 1])  # a/b tie goes to a (ranked first)
    np.testing.assert_allclose(scores["mAP@4"], [(1 + 2 / 4) / 2, (1 / 3 + 2 / 4) / 3])
    at1 = label_retrieval(neighbours, np.array(["a", "c"]), np.array([2, 3]), k=1)
    np.testing.assert_allclose([at1["Acc@1"], at1["MVAcc@1"], at1["mAP@1"]], [[1, 0]] * 3)
    similarity, relevant = np.array([[0.1, 0.5, 0.3], [0.2, 0.2, 0.1]]), np.array([[1, 0, 0], [0, 1, 0]], bool)
    ranks = first_relevant_rank(similarity, relevant)
    np.testing.assert_array_equal(ranks, [2, 1])  # a tie counts against the query


@pytest.mark.slow
def test_evaluate_retrieval_on_trained_model(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    pairs_file, slides_file, model_dir = run
    pairs = load_pairs(pairs_file)
    labels = tmp_path / "labels.csv"
    diagnoses = [report.split()[-1] for report in pairs.reports]
    pd.DataFrame({"slide_id": pairs.slide_ids, "label": diagnoses}).to_csv(labels, index=False)
    metrics = evaluate_retrieval(model_dir, pairs_file, slides_file, labels, split="all", n_boot=200)
    assert metrics["n_pairs"] == 48
    for direction in ("report_to_slide", "slide_to_report"):
        r1, r10 = metrics[direction]["R@1"], metrics[direction]["R@10"]
        assert r1["value"] <= r10["value"] and r10["ci_low"] <= r10["value"] <= r10["ci_high"]
        assert r10["value"] > 10 / 48
    s2s = metrics["slide_to_slide"]
    assert s2s["n"] == 48 and set(s2s["support"]) == {"carcinoma", "adenocarcinoma", "squamous", "benign",
                                                     "necrosis", "metastasis", "lobular", "papillary"}
    assert s2s["Acc@1"]["value"] <= s2s["Acc@5"]["value"]
    assert s2s["Acc@5"]["value"] > 0.5  # slides of one diagnosis share a prototype: well above chance

"""Building an index from chunks (collections larger than memory): the sample, the kind `auto` picks and why,
recall against exact search, save/load, and refusals (chunks that change between passes, a damaged file)."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
import pytest

from tests.support.models import build_tiny_model
from tests.support.synthetic import clustered_embedding_chunks
from vlm.model.clip import SlideTextModel
from vlm.retrieval import SlideIndex, kinds
from vlm.retrieval.index import _keep_smallest

DIM = 32
N = 30_000
CHUNK = 4_000


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> SlideTextModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), slide_embed_dim=8, proj_dim=DIM)


def chunked(n: int = N, seed: int = 0) -> tuple[list[np.ndarray], list[list[str]]]:
    blocks = list(clustered_embedding_chunks(n, DIM, n_clusters=100, intrinsic_dim=8, seed=seed, chunk=CHUNK))
    starts = np.cumsum([0] + [len(b) for b in blocks])
    return blocks, [[f"s{i}" for i in range(a, a + len(b))] for a, b in zip(starts, blocks, strict=False)]


@pytest.fixture(scope="module")
def built(model: SlideTextModel) -> tuple[SlideIndex, np.ndarray]:
    """An ivfpq index `auto` chose for N vectors (thresholds lowered so that N is "large")."""
    blocks, keys = chunked()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kinds, "FLAT_MAX", 1000)
        patch.setattr(kinds, "IVF_MAX", 10_000)
        index = SlideIndex.from_vector_chunks(lambda: zip(blocks, keys, strict=True), model, kind="auto", seed=0)
    return index, np.concatenate(blocks)


def test_sample_is_the_rows_with_the_smallest_draws() -> None:
    """The in-place reservoir keeps exactly the rows a full sort of all draws would pick (a uniform sample)."""
    rng = np.random.default_rng(1)
    rows, draws, ids = np.zeros((0, 2), np.float32), np.zeros(0), np.zeros(0, np.int64)
    all_draws = []
    for start in range(0, 1000, 70):
        new = rng.random(min(70, 1000 - start))
        all_draws.append(new)
        block_ids = np.arange(start, start + len(new))
        block = np.stack([block_ids, block_ids], axis=1).astype(np.float32)
        rows, draws, ids = _keep_smallest(rows, draws, ids, block, new, block_ids, 100)
    expected = np.sort(np.argsort(np.concatenate(all_draws))[:100])
    np.testing.assert_array_equal(np.sort(ids), expected)
    np.testing.assert_array_equal(rows[:, 0], ids)  # each kept row is still the one its id names


@pytest.mark.slow  # trains an ivfpq index
def test_auto_picks_ivfpq_above_the_threshold_and_says_why(model: SlideTextModel, caplog) -> None:  # noqa: ANN001
    blocks, keys = chunked(12_000)
    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.INFO, logger="vlm.retrieval.index"):
        patch.setattr(kinds, "FLAT_MAX", 1000)
        patch.setattr(kinds, "IVF_MAX", 10_000)
        small = SlideIndex.from_vector_chunks(lambda: zip(blocks[:1], keys[:1], strict=True), model, kind="auto")
        large = SlideIndex.from_vector_chunks(lambda: zip(blocks, keys, strict=True), model, kind="auto")
    assert (small.kind, large.kind) == ("ivf", "ivfpq")
    assert large.manifest["requested_kind"] == "auto"
    assert "building a ivfpq index of 12000 slides" in caplog.text and "12,000 vectors > 10,000" in caplog.text


@pytest.mark.slow  # trains an ivfpq index
def test_recall_against_exact_search(built: tuple[SlideIndex, np.ndarray]) -> None:
    index, vectors = built
    assert index.kind == "ivfpq" and len(index) == N and index.manifest["recall"]["reached"]
    queries = next(iter(clustered_embedding_chunks(500, DIM, n_clusters=100, intrinsic_dim=8, seed=0, chunk=500)))
    queries = queries + np.random.default_rng(5).normal(scale=0.01, size=queries.shape).astype(np.float32)
    _, exact = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search_vectors(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact, strict=True)])
    assert recall >= 0.93, recall
    # every row went in under its own key: an indexed vector finds itself first
    assert index.search_slide(["s0", "s29999"], k=1, include_self=True)["slide_id"].tolist() == ["s0", "s29999"]


@pytest.mark.slow  # trains an ivfpq index
def test_save_load_round_trip(built: tuple[SlideIndex, np.ndarray], model: SlideTextModel, tmp_path: Path) -> None:
    index, vectors = built
    index.save(tmp_path / "index")
    loaded = SlideIndex.load(tmp_path / "index", model=model)
    assert (loaded.kind, loaded.params, len(loaded)) == (index.kind, index.params, len(index))
    scores, found = index.search_vectors(vectors[:50], 10)
    again_scores, again = loaded.search_vectors(vectors[:50], 10)
    np.testing.assert_array_equal(found, again)
    np.testing.assert_allclose(scores, again_scores)


@pytest.mark.slow  # trains an ivfpq index
def test_damaged_index_file_is_refused_naming_it(built: tuple[SlideIndex, np.ndarray], tmp_path: Path) -> None:
    index, _ = built
    index.save(tmp_path / "index")
    file = tmp_path / "index" / "index.faiss"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"index\.faiss: damaged or changed"):
        SlideIndex.load(tmp_path / "index")


def test_chunks_that_change_between_passes_are_refused(model: SlideTextModel) -> None:
    blocks, keys = chunked(12_000)
    calls = []

    def drifting():  # noqa: ANN202
        calls.append(1)
        if len(calls) == 2:
            return zip([blocks[0], blocks[1] * 0.5 + blocks[0] * 0.5, *blocks[2:]], keys, strict=True)
        return zip(blocks, keys, strict=True)

    with pytest.raises(ValueError, match="chunk 1 differs between the two passes"):
        SlideIndex.from_vector_chunks(drifting, model, kind="flat")  # checked whatever the kind
    renamed = [keys[0], [f"other-{k}" for k in keys[1]], *keys[2:]]  # same vectors, other ids in chunk 1
    passes = iter([zip(blocks, keys, strict=True), zip(blocks, renamed, strict=True)])
    with pytest.raises(ValueError, match="chunk 1 differs between the two passes"):
        SlideIndex.from_vector_chunks(passes.__next__, model, kind="flat")
    passes = iter([zip(blocks, keys, strict=True), zip(blocks[:2], keys[:2], strict=True)])
    with pytest.raises(ValueError, match="the second pass over the chunks yielded 8000 vectors, the first 12000"):
        SlideIndex.from_vector_chunks(passes.__next__, model, kind="flat")
    with pytest.raises(ValueError, match="duplicate slide_id"):
        SlideIndex.from_vector_chunks(lambda: zip(blocks[:2], [keys[0], keys[0]], strict=True), model, kind="flat")
    with pytest.raises(ValueError, match="empty collection: the chunks held no vectors"):
        SlideIndex.from_vector_chunks(lambda: iter(()), model, kind="flat")

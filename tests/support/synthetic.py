"""Synthetic inputs for tests and benchmarks: tissue images, separable slide/report pairs, clustered embeddings.

Clustered embeddings: real slide embeddings are not isotropic noise: slides of one tissue/diagnosis form
clusters, and within a cluster they vary along a few directions (stain, grade, site). Uniform random vectors
would make every neighbour nearly equidistant, which no ANN index (and no user) meets, so recall figures on
them mislead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd


def clustered_embeddings(
    n: int,
    dim: int,
    *,
    n_clusters: int = 1000,
    intrinsic_dim: int = 16,
    spread: float = 0.5,
    noise: float = 0.05,
    seed: int = 0,
    chunk: int = 100_000,
) -> np.ndarray:
    """[n, dim] float32, L2-normalised: cluster centre + a point in the cluster's own low-rank subspace
    (`intrinsic_dim` directions scaled by `spread`) + small isotropic `noise`. Deterministic in `seed`.

    Generated in chunks of `chunk` rows so that 1M x 512 needs no temporary copies beyond the output.
    """
    if n < 1 or dim < 1:
        raise ValueError(f"n and dim must be positive, got n={n}, dim={dim}")
    rng = np.random.default_rng(seed)
    centres, bases = _clusters(rng, dim, n_clusters, intrinsic_dim, spread)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        out[start:stop] = _cluster_block(rng, centres, bases, stop - start, noise)
    return out


def clustered_embedding_chunks(
    n: int,
    dim: int,
    *,
    n_clusters: int = 1000,
    intrinsic_dim: int = 16,
    spread: float = 0.5,
    noise: float = 0.05,
    seed: int = 0,
    chunk: int = 100_000,
) -> Iterator[np.ndarray]:
    """The same distribution as `clustered_embeddings`, yielded chunk by chunk: [chunk, dim] float32 blocks,
    n rows in all. Chunk i is seeded by (seed, i), so every pass yields the same rows and a collection larger
    than memory (10M x 512 = 20 GB) is never held whole."""
    if n < 1 or dim < 1:
        raise ValueError(f"n and dim must be positive, got n={n}, dim={dim}")
    centres, bases = _clusters(np.random.default_rng(seed), dim, n_clusters, intrinsic_dim, spread)
    for i, start in enumerate(range(0, n, chunk)):
        yield _cluster_block(np.random.default_rng([seed, i]), centres, bases, min(chunk, n - start), noise)


def _clusters(
    rng: np.random.Generator, dim: int, n_clusters: int, intrinsic_dim: int, spread: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster centres [C, dim] and each cluster's subspace basis [C, rank, dim]."""
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32) / np.sqrt(dim)
    rank = min(intrinsic_dim, dim)
    bases = rng.standard_normal((n_clusters, rank, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    return centres, bases


def _cluster_block(
    rng: np.random.Generator, centres: np.ndarray, bases: np.ndarray, size: int, noise: float
) -> np.ndarray:
    """[size, dim] L2-normalised points drawn from the clusters."""
    n_clusters, rank, dim = bases.shape
    cluster = rng.integers(0, n_clusters, size=size)
    block = centres[cluster] + rng.standard_normal((size, dim), dtype=np.float32) * (noise / np.sqrt(dim))
    coords = rng.standard_normal((size, rank), dtype=np.float32)
    order = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[order], np.arange(n_clusters + 1))
    for c in np.flatnonzero(np.diff(bounds)):  # one small matmul per cluster, no [b, rank, dim] gather
        rows = order[bounds[c] : bounds[c + 1]]
        block[rows] += coords[rows] @ bases[c]
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    return block


# Synthetic slides: white glass with one rectangle of textured pink "tissue" at a known place.
# At 0.5 mpp a tile is 256 level-0 px; at 0.25 mpp it is 512. The rectangle spans 4 x 2 tiles.
TISSUE_05 = (512, 768, 1536, 1280)  # x0, y0, x1, y1 in level-0 px
TISSUE_025 = (1024, 1536, 3072, 2560)


def tissue_image(width: int, height: int, box: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """White background with H&E-like pink/purple noise inside `box` (level-0 px)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 245, np.uint8)
    x0, y0, x1, y1 = box
    noise = rng.integers(-25, 25, size=(y1 - y0, x1 - x0, 1))
    base = np.array([200, 110, 170])
    image[y0:y1, x0:x1] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return image


def textured_tiles(count: int, size: int, seed: int = 0) -> np.ndarray:
    """H&E-like smooth colour fields with sharp nuclei-like dots: both smooth and high-frequency content."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    tiles = []
    for _ in range(count):
        base = np.stack(
            [
                200 + 40 * np.sin(6 * xx + rng.uniform(0, 6)),
                110 + 50 * np.cos(5 * yy),
                170 + 30 * np.sin(4 * (xx + yy)),
            ],
            axis=-1,
        )
        base += rng.normal(0, 12, base.shape)
        for _ in range(30):
            cx, cy, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(2, 8))]
            base[(xx * size - cx) ** 2 + (yy * size - cy) ** 2 < r * r] = (70, 40, 120)
        tiles.append(np.clip(base, 0, 255).astype(np.uint8))
    return np.stack(tiles)


DIAGNOSES = "carcinoma adenocarcinoma squamous benign necrosis metastasis lobular papillary".split()
GRADES = "high low well poorly moderately clear".split()
DIM = 16


def write_synthetic(root: Path, test_rows: int = 0) -> tuple[Path, Path]:
    """48 separable pairs: report "<grade> grade <diagnosis>", slide embedding = sum of two prototypes.

    `test_rows` extra pairs get split=test and NaN embeddings: training on one would make the loss NaN.
    """
    rng = np.random.default_rng(0)
    diag, grade = rng.normal(size=(len(DIAGNOSES), DIM)), rng.normal(size=(len(GRADES), DIM))
    rows, slides = [], []
    for i, (a, b) in enumerate((a, b) for a in range(len(DIAGNOSES)) for b in range(len(GRADES))):
        split = "val" if i % 4 == 0 else "train"
        report = f"{GRADES[b]} grade {DIAGNOSES[a]}" + (" with necrosis" * 10 if i == 1 else "")  # truncated
        rows.append({"slide_id": f"s{i}", "report": report, "patient_id": f"p{i}", "split": split})
        slides.append({"slide_id": f"s{i}", "embedding": diag[a] + grade[b] + 0.1 * rng.normal(size=DIM)})
    for j in range(test_rows):
        rows.append({"slide_id": f"t{j}", "report": "benign", "patient_id": f"t{j}", "split": "test"})
        slides.append({"slide_id": f"t{j}", "embedding": np.full(DIM, np.nan)})
    pairs, embeddings = root / "pairs.csv", root / "slides.parquet"
    pd.DataFrame(rows).to_csv(pairs, index=False)
    frame = pd.DataFrame(slides).assign(n_tiles=10, encoder="tiny", pool="mean")
    frame["embedding"] = frame["embedding"].map(lambda e: [float(x) for x in e])
    frame.to_parquet(embeddings)
    return pairs, embeddings

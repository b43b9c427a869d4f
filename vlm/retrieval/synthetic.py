"""Clustered synthetic embeddings for index tests and benchmarks.

Real slide embeddings are not isotropic noise: slides of one tissue/diagnosis form clusters, and within a
cluster they vary along a few directions (stain, grade, site). Uniform random vectors would make every
neighbour nearly equidistant, which no ANN index (and no user) meets, so recall figures on them mislead.
"""

from __future__ import annotations

import numpy as np


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
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32) / np.sqrt(dim)
    rank = min(intrinsic_dim, dim)
    bases = rng.standard_normal((n_clusters, rank, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        cluster = rng.integers(0, n_clusters, size=stop - start)
        block = centres[cluster] + rng.standard_normal((stop - start, dim), dtype=np.float32) * (
            noise / np.sqrt(dim)
        )  # [b, dim]
        coords = rng.standard_normal((stop - start, rank), dtype=np.float32)
        order = np.argsort(cluster, kind="stable")
        bounds = np.searchsorted(cluster[order], np.arange(n_clusters + 1))
        for c in np.flatnonzero(np.diff(bounds)):  # one small matmul per cluster, no [b, rank, dim] gather
            rows = order[bounds[c] : bounds[c + 1]]
            block[rows] += coords[rows] @ bases[c]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out

"""Evaluation metrics. Retrieval: Recall@K between paired queries and gallery items (DESIGN §8)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def recall_at_k(similarity: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose paired item (same index: row i pairs with column i) is in the top K.

    `similarity` is [N_query, N_gallery] with N_gallery >= N_query. Ties are broken against the query
    (an item scoring equal to the pair counts as ranked above it), so a constant score gets no credit.
    """
    if similarity.ndim != 2 or similarity.shape[1] < similarity.shape[0]:
        raise ValueError(
            f"similarity must be [N, M] with M >= N (row i pairs with column i), got {tuple(similarity.shape)}"
        )
    n = similarity.shape[0]
    if n == 0:
        raise ValueError("recall_at_k needs at least one query")
    paired = similarity.diagonal()[:, None]  # [N, 1]
    rank = (similarity >= paired).sum(dim=1) - 1  # items other than the pair scoring at least as high
    return {int(k): float((rank < k).float().mean()) for k in ks}


def retrieval_recalls(slide: Tensor, text: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Report→slide and slide→report Recall@K of paired, normalised embeddings (row i of each is a pair).

    Keys name the direction and K (`report_to_slide/R@1`, …) plus `mean_recall` over both directions and
    all K, the single number used to pick the best checkpoint.
    """
    similarity = text.float() @ slide.float().T  # [N reports, N slides]
    out: dict[str, float] = {}
    for name, sim in (("report_to_slide", similarity), ("slide_to_report", similarity.T)):
        for k, value in recall_at_k(sim, ks).items():
            out[f"{name}/R@{k}"] = value
    out["mean_recall"] = float(torch.tensor(list(out.values())).mean())
    return out

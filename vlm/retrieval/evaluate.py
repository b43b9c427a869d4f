"""`vlm eval retrieval`: report ↔ slide Recall@K and slide → slide Acc@K / MVAcc@K / mAP@K, with bootstrap CIs.

Scores are exact (brute-force dot products of the projected, normalised embeddings): evaluation measures the
model, not an ANN index's approximation. Evaluate on the `test` split; choosing K or a model on it would make
the figures optimistic.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlm.errors import InputError
from vlm.formats.embeddings import load_slide_embeddings
from vlm.formats.pairs import check_slides_available, load_pairs
from vlm.formats.tables import read_table
from vlm.metrics import bootstrap_ci, first_relevant_rank, label_retrieval
from vlm.retrieval.index import ModelArg, project_slides, resolve_model
from vlm.settings import N_BOOT

log = logging.getLogger(__name__)

RECALL_DEFINITIONS = {
    "case": "pairs rows sharing a patient_id, a report text or a slide_id are one case (transitively)",
    "report_to_slide": "R@K: fraction of pairs whose report ranks a slide of its own case among the K most "
    "similar evaluated slides (each slide once; other slides scoring equal count above it)",
    "slide_to_report": "R@K: fraction of pairs whose slide ranks a report row of its own case among the K most "
    "similar evaluated reports (one per pair row; ties count against it)",
    "mean_recall": "mean over pairs of the hits at every K in both directions",
}


def evaluate_retrieval(
    model: ModelArg,
    pairs: str | os.PathLike[str],
    slides: str | os.PathLike[str],
    labels: str | os.PathLike[str] | None = None,
    *,
    split: str = "auto",
    ks: Sequence[int] = (1, 5, 10),
    n_boot: int = N_BOOT,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Retrieval metrics of `model` on the pairs of `split`, JSON-ready; each value has a percentile CI.

    `split="auto"` takes the `test` rows when the pairs have a split column, else every pair (logged).
    A hit is any item of the query's case (`Pairs.cases`: rows sharing a patient_id, report or slide), so
    a case's other slides count for its report (`RECALL_DEFINITIONS`, written into the result).
    Recall CIs resample pairs; label metrics resample query slides (stratified by label). Slide → slide
    is leave-one-out: each labelled slide queries all the others.
    """
    model, _ = resolve_model(model)
    table = load_pairs(pairs)
    if split == "auto":
        split = "test" if table.splits is not None and "test" in table.splits else "all"
        log.info("evaluating on %s pairs", "the test" if split == "test" else "all")
    if split != "all":
        if table.splits is None:
            raise InputError(f"{pairs}: no split column, so `split` {split} selects nothing; use `split` all")
        table = table.select(table.indices(split))
    if len(table) == 0:
        raise InputError(f"{pairs}: no pairs in split {split!r}")
    embeddings = load_slide_embeddings(slides)
    check_slides_available(table, set(embeddings.ids), str(slides))
    slide_ids = list(dict.fromkeys(table.slide_ids))  # unique, in pairs order
    embeddings.check_finite(slide_ids)
    slide_vectors = project_slides(model, embeddings.lookup(slide_ids))  # [S, D]
    text_vectors = model.encode_text(table.reports, device="cpu").numpy()  # [R, D]
    column = {s: i for i, s in enumerate(slide_ids)}
    paired = np.array([column[s] for s in table.slide_ids])  # [R] slide column of each report
    cases = np.array(table.cases())  # [R]: one slide_id is one case, so each slide has one case
    slide_case = np.empty(len(slide_ids), dtype=np.int64)
    slide_case[paired] = cases
    relevant = cases[:, None] == slide_case[None, :]  # [R, S]: any slide of the report's case is a hit
    similarity = text_vectors @ slide_vectors.T
    to_slide = first_relevant_rank(similarity, relevant)  # [R]
    to_report = first_relevant_rank(similarity.T, relevant.T)[paired]  # [R]: the slide of each pair
    boot = {"n_boot": n_boot, "seed": seed, "alpha": alpha}
    out: dict[str, Any] = {
        "split": split, "n_pairs": len(table), "n_slides": len(slide_ids), "n_cases": int(len(np.unique(cases))),
        "definitions": RECALL_DEFINITIONS,
    }
    for name, ranks in (("report_to_slide", to_slide), ("slide_to_report", to_report)):
        out[name] = {f"R@{k}": _with_ci((ranks < k).astype(float), **boot) for k in ks}
    hits = np.stack([(r < k).astype(float) for r in (to_slide, to_report) for k in ks], axis=1)  # [R, 2K]
    out["mean_recall"] = _with_ci(hits.mean(axis=1), **boot)
    if labels is not None:
        out["slide_to_slide"] = _label_metrics(slide_ids, slide_vectors, labels, ks, **boot)
    out["bootstrap"] = {**boot, "method": "percentile"}
    return out


def _label_metrics(
    slide_ids: list[str], vectors: np.ndarray, labels_path: str | os.PathLike[str], ks: Sequence[int], **boot: Any
) -> dict[str, Any]:
    """Leave-one-out slide → slide Acc@K / MVAcc@K / mAP@K over the evaluated slides that have a label."""
    table = read_table(labels_path, required=("slide_id", "label"), what="labels", all_text=True)
    label_of = {s: label for s, label in zip(table["slide_id"], table["label"], strict=True) if label.strip()}
    keep = [i for i, s in enumerate(slide_ids) if s in label_of]
    if len(keep) < len(slide_ids):
        log.warning("%d of %d evaluated slides have no label in %s and are left out of slide → slide",
                    len(slide_ids) - len(keep), len(slide_ids), labels_path)
    k_max = max(ks)
    if len(keep) <= k_max:
        raise InputError(f"slide → slide @{k_max} needs more than {k_max} labelled slides, got {len(keep)}")
    labels = np.array([label_of[slide_ids[i]] for i in keep])
    vectors = vectors[keep]
    neighbours = np.empty((len(keep), k_max), dtype=np.int64)
    for start in range(0, len(keep), 1024):  # bounded memory: one [1024, N] block of scores at a time
        block = vectors[start : start + 1024] @ vectors.T
        block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf  # leave the query out
        neighbours[start : start + len(block)] = np.argsort(-block, axis=1, kind="stable")[:, :k_max]
    counts = {label: int((labels == label).sum()) for label in np.unique(labels)}
    n_relevant = np.array([counts[label] - 1 for label in labels])
    out: dict[str, Any] = {"n": len(keep), "support": counts}
    warnings = _vote_warnings(counts, ks)
    for warning in warnings:
        log.warning("%s", warning)
    if warnings:
        out["warnings"] = warnings
    for k in ks:
        for name, values in label_retrieval(labels[neighbours], labels, n_relevant, k).items():
            out[name] = _with_ci(values, strata=labels, **boot)
    return out


def _vote_warnings(counts: dict[str, int], ks: Sequence[int]) -> list[str]:
    """MVAcc@K is a majority vote of the K nearest slides: where a class has fewer than K/2 other slides, its
    queries can never hold a majority, and the metric is (near) 0 by construction, whatever the model."""
    warnings = []
    for k in ks:
        short = {label: n for label, n in counts.items() if 2 * (n - 1) < k}
        if short:
            largest_ok = 2 * (min(counts.values()) - 1)
            classes = ", ".join(f"{label} ({n} slides)" for label, n in sorted(short.items()))
            warnings.append(
                f"MVAcc@{k} is (near) 0 by construction for {classes}: fewer than {k}/2 other slides share "
                f"their label, so the {k} nearest can never hold a majority of it; use K <= {max(largest_ok, 1)} "
                "for MVAcc, or more slides per class"
            )
    return warnings


def _with_ci(values: np.ndarray, *, strata: np.ndarray | None = None, **boot: Any) -> dict[str, float]:
    """Mean of per-case values with its percentile-bootstrap CI over cases."""
    low, high = bootstrap_ci(lambda idx: float(values[idx].mean()), len(values), strata=strata, **boot)
    return {"value": float(values.mean()), "ci_low": low, "ci_high": high}

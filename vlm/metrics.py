"""Evaluation metrics. Retrieval: Recall@K between paired queries and gallery items.
Classification: scikit-learn metrics with seeded percentile-bootstrap CIs (`bootstrap_ci` is shared).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlm.errors import InputError, UsageError
from vlm.settings import N_BOOT

log = logging.getLogger(__name__)


def recall_at_k(similarity: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose paired item (same index: row i pairs with column i) is in the top K.

    `similarity` is [N_query, N_gallery] with N_gallery >= N_query. Ties are broken against the query
    (an item scoring equal to the pair counts as ranked above it), so a constant score gets no credit; a
    non-finite (NaN, inf) pair score counts as a miss.
    """
    if similarity.ndim != 2 or similarity.shape[1] < similarity.shape[0]:
        raise InputError(
            f"similarity must be [N, M] with M >= N (row i pairs with column i), got {tuple(similarity.shape)}"
        )
    n = similarity.shape[0]
    if n == 0:
        raise UsageError("recall_at_k needs at least one query")
    paired = similarity.diagonal()[:, None]  # [N, 1]
    rank = (similarity >= paired).sum(dim=1) - 1  # items other than the pair scoring at least as high
    # NaN >= NaN is false, which would rank a NaN pair first: a non-finite pair score is a miss at every K.
    rank = torch.where(torch.isfinite(paired[:, 0]), rank, torch.iinfo(rank.dtype).max)
    return {int(k): float((rank < k).float().mean()) for k in ks}


def retrieval_recalls(
    slide: Tensor, text: Tensor, ks: Sequence[int] = (1, 5, 10), cases: Sequence[int] | None = None
) -> dict[str, float]:
    """Report→slide and slide→report Recall@K of paired, normalised embeddings (row i of each is a pair).

    Keys name the direction and K (`report_to_slide/R@1`, …) plus `mean_recall` over both directions and
    all K, the single number used to pick the best checkpoint. With `cases` (one case number per row,
    `Pairs.cases`), a query's hit is any item of its case: report→slide counts any slide of the report's
    case, slide→report any report row of the slide's case (ranked by `first_relevant_rank`).
    """
    similarity = text.float() @ slide.float().T  # [N reports, N slides]
    out: dict[str, float] = {}
    if cases is not None and len(set(cases)) < len(cases):
        case = np.asarray(cases)
        relevant = case[:, None] == case[None, :]
        sim = similarity.detach().cpu().numpy()
        for name, (scores, rel) in (("report_to_slide", (sim, relevant)), ("slide_to_report", (sim.T, relevant.T))):
            rank = first_relevant_rank(scores, rel)
            for k in ks:
                out[f"{name}/R@{k}"] = float((rank < k).mean())
        out["mean_recall"] = float(np.mean(list(out.values())))
        return out
    for name, sim in (("report_to_slide", similarity), ("slide_to_report", similarity.T)):
        for k, value in recall_at_k(sim, ks).items():
            out[f"{name}/R@{k}"] = value
    out["mean_recall"] = float(torch.tensor(list(out.values())).mean())
    return out


# --- Classification: scikit-learn metrics with percentile-bootstrap confidence intervals ---


def bootstrap_indices(
    n: int, *, n_boot: int = N_BOOT, seed: int = 0, strata: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """Yield `n_boot` resamples (with replacement) of the case indices `0..n-1`.

    With `strata` (one label per case), a resample that misses any label present in `strata` is redrawn,
    so that per-class metrics (AUROC, recall) stay defined in every replicate. Seeded: the same arguments
    give the same resamples, so metrics computed in separate passes see identical replicates.
    """
    if n < 1:
        raise UsageError(f"the bootstrap needs at least one case, got n={n}")
    if n_boot < 1:
        raise UsageError(f"n_boot must be >= 1, got {n_boot}")
    codes: np.ndarray | None = None
    n_classes = 0
    if strata is not None:
        strata = np.asarray(strata)
        if strata.shape != (n,):
            raise InputError(f"strata must hold one label per case (shape ({n},)), got shape {strata.shape}")
        _, codes = np.unique(strata, return_inverse=True)
        n_classes = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    max_draws = 100 * n_boot
    draws = kept = 0
    while kept < n_boot:
        if draws >= max_draws:
            raise UsageError(
                f"bootstrap: {draws} draws gave only {kept} replicates holding every class; a class is too "
                "rare for resampling (add cases of it, or drop the class)"
            )
        draws += 1
        indices = rng.integers(0, n, size=n)
        if codes is not None and np.bincount(codes[indices], minlength=n_classes).min() == 0:
            continue  # a replicate that misses a class is redrawn
        kept += 1
        yield indices
    if draws > kept:
        log.debug("bootstrap: redrew %d of %d replicates that missed a class", draws - kept, draws)


def percentile_interval(values: Sequence[float] | np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The (alpha/2, 1-alpha/2) percentiles of bootstrap replicates; non-finite replicates are left out."""
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size < values.size:
        log.warning("bootstrap: %d of %d replicates gave an undefined value and were left out",
                    values.size - finite.size, values.size)
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    strata: np.ndarray | None = None,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """95 % (by default) percentile-bootstrap confidence interval of a metric over `n` cases.

    `statistic(indices)` computes the metric on the resampled case indices. `strata` (labels), when given,
    makes replicates that miss a class get redrawn. Reproducible: the same `seed` gives the same interval.
    """
    resamples = bootstrap_indices(n, n_boot=n_boot, seed=seed, strata=strata)
    return percentile_interval([float(statistic(indices)) for indices in resamples], alpha)


def classification_point_metrics(
    labels: np.ndarray, probabilities: np.ndarray, positive: int | None
) -> dict[str, float]:
    """Balanced accuracy, weighted F1, Cohen's κ, AUROC and AUPRC of the full sample, by scikit-learn.

    AUROC/AUPRC: a binary task scores its positive class; otherwise the one-vs-rest macro average over the
    classes that have cases (equal to scikit-learn's `multi_class="ovr"` macro when every class has cases).
    """
    from sklearn.metrics import (
        average_precision_score,
        balanced_accuracy_score,
        cohen_kappa_score,
        f1_score,
        roc_auc_score,
    )

    predicted = probabilities.argmax(axis=1)
    present = np.unique(labels)
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": reported by the caller
        warnings.simplefilter("ignore", UserWarning)
        out = {
            "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
            "weighted_f1": float(f1_score(labels, predicted, average="weighted", zero_division=0)),
        }
    if present.size < 2:  # one kind of case only: κ and the ranking metrics are undefined
        return {**out, "cohen_kappa": float("nan"), "auroc": float("nan"), "auprc": float("nan")}
    scored = [positive] if positive is not None else list(present)
    return {
        **out,
        "cohen_kappa": float(cohen_kappa_score(labels, predicted)),
        "auroc": float(np.mean([roc_auc_score(labels == c, probabilities[:, c]) for c in scored])),
        "auprc": float(np.mean([average_precision_score(labels == c, probabilities[:, c]) for c in scored])),
    }


def _fast_point(
    labels: np.ndarray, probabilities: np.ndarray, positive: int | None, n_classes: int
) -> dict[str, float]:
    """The same five metrics as `classification_point_metrics`, in plain numpy for bootstrap replicates.

    scikit-learn's per-call input checks cost ~5 ms, which made 1,000 replicates take most of a minute;
    these closed forms are ~50x faster and tests hold them equal to scikit-learn (ties included).
    """
    predicted = probabilities.argmax(axis=1)
    matrix = np.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes)
    matrix = matrix.reshape(n_classes, n_classes).astype(np.float64)
    support, predicted_count, hits = matrix.sum(axis=1), matrix.sum(axis=0), np.diag(matrix)
    present = support > 0
    n = float(labels.size)
    denominator = support + predicted_count  # 2·tp + fp + fn
    f1 = np.divide(2 * hits, denominator, out=np.zeros(n_classes), where=denominator > 0)
    expected = float(support @ predicted_count) / n**2
    observed = hits.sum() / n
    if present.sum() < 2:
        kappa = auroc = auprc = float("nan")
    else:
        kappa = (observed - expected) / (1 - expected) if expected < 1 else float("nan")
        scored = [positive] if positive is not None else np.flatnonzero(present)
        auroc = float(np.mean([_auroc(labels == c, probabilities[:, c]) for c in scored]))
        auprc = float(np.mean([_average_precision(labels == c, probabilities[:, c]) for c in scored]))
    return {
        "balanced_accuracy": float(np.mean(hits[present] / support[present])),
        "weighted_f1": float(f1 @ support / n),
        "cohen_kappa": float(kappa),
        "auroc": auroc,
        "auprc": auprc,
    }


def _auroc(truth: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann–Whitney statistic with mid-ranks (ties count one half), as scikit-learn's."""
    from scipy.stats import rankdata

    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_precision(truth: np.ndarray, score: np.ndarray) -> float:
    """Σ (R_k − R_{k−1}) · P_k over distinct score thresholds, high to low (scikit-learn's definition)."""
    n_pos = int(truth.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-score, kind="mergesort")
    score, truth = score[order], truth[order]
    last = np.r_[np.flatnonzero(np.diff(score)), truth.size - 1]  # last case of each distinct threshold
    true_pos = np.cumsum(truth)[last]
    precision = true_pos / (last + 1)
    recall = true_pos / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def classification_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    *,
    positive: int | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Balanced accuracy, weighted F1, Cohen's κ, AUROC, AUPRC and the confusion matrix, with CIs; JSON-ready.

    `labels` [N] are class indices into `class_names`; `probabilities` [N, C] are per-class scores whose
    argmax is the prediction. `positive` (an index) makes AUROC/AUPRC binary on that class's score. Point
    values come from scikit-learn; every metric and each cell of the row-normalised confusion matrix gets a
    percentile CI from the same `n_boot` stratified replicates (see `bootstrap_indices`). Undefined
    values (e.g. AUROC when only one class has cases) are None, never guessed. The result does not depend on
    the order of the rows.
    """
    from sklearn.metrics import confusion_matrix

    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n_classes = len(class_names)
    if probabilities.ndim != 2 or probabilities.shape != (labels.shape[0], n_classes):
        raise InputError(
            f"probabilities must be [N, C] = [{labels.shape[0]}, {n_classes}], got {probabilities.shape}"
        )
    if labels.size == 0:
        raise InputError("no labelled cases to evaluate: check that the labels file names the scored slides")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise InputError(
            f"labels must be class indices in [0, {n_classes}), got {labels.min()}..{labels.max()}"
        )
    if positive is not None and not 0 <= positive < n_classes:
        raise InputError(f"positive must be a class index in [0, {n_classes}), got {positive}")

    # Rows in one canonical order (by label, then scores) before resampling: the CIs of the same predictions
    # must not depend on how a caller ordered them (a CSV read back, a notebook's merge).
    order = np.lexsort([*probabilities.T[::-1], labels])
    labels, probabilities = labels[order], probabilities[order]
    index = list(range(n_classes))
    matrix = confusion_matrix(labels, probabilities.argmax(axis=1), labels=index)
    point = classification_point_metrics(labels, probabilities, positive)
    replicates: dict[str, list[float]] = {name: [] for name in point}
    cells: list[np.ndarray] = []
    for indices in bootstrap_indices(labels.size, n_boot=n_boot, seed=seed, strata=labels):
        for name, value in _fast_point(labels[indices], probabilities[indices], positive, n_classes).items():
            replicates[name].append(value)
        resampled = np.bincount(
            labels[indices] * n_classes + probabilities[indices].argmax(axis=1), minlength=n_classes**2
        )
        cells.append(_row_normalised(resampled.reshape(n_classes, n_classes)))
    metrics = {}
    for name, value in point.items():
        low, high = percentile_interval(replicates[name], alpha) if np.isfinite(value) else (np.nan, np.nan)
        metrics[name] = {
            "value": _json_float(value),
            "ci_low": _json_float(low),
            "ci_high": _json_float(high),
        }
    with warnings.catch_warnings():  # rows of classes without cases are NaN in every replicate
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(np.stack(cells), [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return {
        "n": int(labels.size),
        "support": {class_names[c]: int((labels == c).sum()) for c in index},
        "classes_without_cases": [class_names[c] for c in index if not (labels == c).any()],
        "positive": class_names[positive] if positive is not None else None,
        "metrics": metrics,
        "confusion_matrix": {
            "classes": list(class_names),
            "rows": "true class",
            "columns": "predicted class",
            "counts": matrix.tolist(),
            "row_normalised": _nested(_row_normalised(matrix)),
            "row_normalised_ci_low": _nested(low),
            "row_normalised_ci_high": _nested(high),
        },
        "bootstrap": {"n_boot": n_boot, "seed": seed, "alpha": alpha, "method": "percentile, stratified"},
    }


def _row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its total (recall per true class); rows without cases stay NaN."""
    totals = matrix.sum(axis=1, keepdims=True).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return matrix / totals


def _json_float(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _nested(array: np.ndarray) -> list[list[float | None]]:
    return [[_json_float(v) for v in row] for row in array]


# --- Retrieval by relevance and by label: report <-> slide ranks, slide -> slide Acc@K / MVAcc@K / mAP@K ---


def first_relevant_rank(similarity: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """[Q] 0-based rank of each query's best-scoring relevant item among the gallery.

    `similarity` and `relevant` are [Q, G]; rank = number of non-relevant items scoring at least as high as
    that item, so ties count against the query (as in `recall_at_k`) and Recall@K = mean(rank < K); a query
    whose relevant scores are not finite gets the largest int64 (a miss at every K). Used
    when a query may have several relevant items (a slide with two reports).
    """
    similarity, relevant = np.asarray(similarity, dtype=np.float64), np.asarray(relevant, dtype=bool)
    if similarity.ndim != 2 or similarity.shape != relevant.shape:
        raise UsageError(
            f"similarity and relevant must be [Q, G] of one shape, got {similarity.shape} and {relevant.shape}"
        )
    lonely = np.flatnonzero(~relevant.any(axis=1))
    if lonely.size:
        raise UsageError(f"queries {lonely[:10].tolist()} have no relevant item in the gallery; drop them")
    best = np.where(relevant, similarity, -np.inf).max(axis=1, keepdims=True)  # [Q, 1]
    rank = ((similarity >= best) & ~relevant).sum(axis=1)
    # NaN >= NaN is false, which would rank a NaN query first: a non-finite best score is a miss at every K.
    return np.where(np.isfinite(best[:, 0]), rank, np.iinfo(np.int64).max)


def label_retrieval(
    neighbour_labels: np.ndarray, query_labels: np.ndarray, n_relevant: np.ndarray, k: int
) -> dict[str, np.ndarray]:
    """Per-query slide → slide retrieval scores at `k` from each query's ranked neighbours' labels.

    `neighbour_labels` [Q, >=k] are the labels of the nearest items, best first (the query itself already
    left out); `n_relevant` [Q] counts the gallery items sharing the query's label. Returns [Q] arrays:
    - `Acc@k`: 1 if any of the top k shares the label;
    - `MVAcc@k`: 1 if the majority label of the top k is the query's (a tie goes to the tied label met
      first in rank order);
    - `mAP@k`: average precision at k, sum over hits of precision-at-rank / min(k, n_relevant) (0 when the
      gallery holds no other item of that label).
    Means over queries give the metrics; per-query values let `bootstrap_ci` resample queries.
    """
    top = np.asarray(neighbour_labels)[:, :k]
    query_labels = np.asarray(query_labels)
    if top.shape[1] < k:
        raise UsageError(f"need at least k={k} neighbours per query, got {top.shape[1]}")
    hits = top == query_labels[:, None]  # [Q, k]
    majority = np.array([_majority(row) for row in top])
    precision = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    denominator = np.minimum(k, np.asarray(n_relevant))
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(denominator > 0, (precision * hits).sum(axis=1) / denominator, 0.0)
    return {
        f"Acc@{k}": hits.any(axis=1).astype(float),
        f"MVAcc@{k}": (majority == query_labels).astype(float),
        f"mAP@{k}": ap,
    }


def _majority(labels: np.ndarray) -> object:
    """Most frequent label; among equally frequent ones, the one ranked first."""
    values, first, counts = np.unique(labels, return_index=True, return_counts=True)
    tied = np.flatnonzero(counts == counts.max())
    return values[tied[np.argmin(first[tied])]]

"""Classification metrics and the bootstrap: equal to scikit-learn, honest CIs, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

from vlm.metrics import bootstrap_ci, bootstrap_indices, classification_metrics


def _scores(n: int, n_classes: int, seed: int = 0, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities that carry some (noisy) class signal."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, size=n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), labels] += signal
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


def test_multiclass_metrics_equal_sklearn() -> None:
    labels, probs = _scores(120, 3)
    out = classification_metrics(labels, probs, ["a", "b", "c"], n_boot=50)
    pred = probs.argmax(1)
    m = out["metrics"]
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert m["weighted_f1"]["value"] == pytest.approx(f1_score(labels, pred, average="weighted"))
    assert m["cohen_kappa"]["value"] == pytest.approx(cohen_kappa_score(labels, pred))
    assert m["auroc"]["value"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    binary = label_binarize(labels, classes=[0, 1, 2])
    assert m["auprc"]["value"] == pytest.approx(average_precision_score(binary, probs, average="macro"))
    assert out["confusion_matrix"]["counts"] == confusion_matrix(labels, pred).tolist()
    assert out["support"] == {c: int((labels == i).sum()) for i, c in enumerate("abc")}


def test_binary_metrics_score_the_positive_class() -> None:
    labels, probs = _scores(80, 2, seed=1)
    out = classification_metrics(labels, probs, ["wt", "mut"], positive=1, n_boot=50)
    assert out["positive"] == "mut"
    assert out["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(labels == 1, probs[:, 1]))
    assert out["metrics"]["auprc"]["value"] == pytest.approx(average_precision_score(labels == 1, probs[:, 1]))


def test_cis_contain_the_estimate_and_shrink_with_more_cases() -> None:
    widths = []
    for n in (60, 600):
        labels, probs = _scores(n, 2, seed=2)
        out = classification_metrics(labels, probs, ["x", "y"], positive=1, n_boot=200)
        for name, metric in out["metrics"].items():
            assert metric["ci_low"] <= metric["value"] <= metric["ci_high"], name
        widths.append(out["metrics"]["auroc"]["ci_high"] - out["metrics"]["auroc"]["ci_low"])
    assert widths[1] < widths[0] / 2


def test_bootstrap_ci_is_reproducible_and_matches_the_metrics_report() -> None:
    labels, probs = _scores(100, 2, seed=3)
    order = np.lexsort([*probs.T[::-1], labels])  # the report resamples rows in this canonical order
    labels, probs = labels[order], probs[order]

    def auroc(indices: np.ndarray) -> float:
        return roc_auc_score(labels[indices] == 1, probs[indices, 1])

    first = bootstrap_ci(auroc, labels.size, n_boot=100, seed=7, strata=labels)
    assert first == bootstrap_ci(auroc, labels.size, n_boot=100, seed=7, strata=labels)
    assert first != bootstrap_ci(auroc, labels.size, n_boot=100, seed=8, strata=labels)
    report = classification_metrics(labels, probs, ["x", "y"], positive=1, n_boot=100, seed=7)
    assert (report["metrics"]["auroc"]["ci_low"], report["metrics"]["auroc"]["ci_high"]) == pytest.approx(first)


def test_stratified_bootstrap_redraws_replicates_missing_a_class() -> None:
    strata = np.array([0] * 19 + [1])  # the single case of class 1 is missed by ~36 % of plain resamples
    plain = list(bootstrap_indices(20, n_boot=200, seed=0))
    assert any(not (strata[i] == 1).any() for i in plain)
    for indices in bootstrap_indices(20, n_boot=200, seed=0, strata=strata):
        assert (strata[indices] == 1).any()
    assert len(list(bootstrap_indices(20, n_boot=200, seed=0, strata=strata))) == 200


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="one label per case"):
        bootstrap_ci(lambda i: 0.0, 5, strata=np.zeros(4))
    with pytest.raises(ValueError, match="at least one case"):
        bootstrap_ci(lambda i: 0.0, 0)
    with pytest.raises(ValueError, match="probabilities must be"):
        classification_metrics(np.array([0, 1]), np.ones((2, 3)) / 3, ["a", "b"])


def test_metrics_without_a_class_are_reported_not_invented() -> None:
    labels = np.zeros(10, dtype=int)
    probs = np.tile([0.7, 0.3], (10, 1))
    probs[:4] = [0.2, 0.8]  # 4 of the 10 class-a cases predicted b
    out = classification_metrics(labels, probs, ["a", "b"], positive=1, n_boot=50)
    assert out["classes_without_cases"] == ["b"]
    assert out["metrics"]["auroc"]["value"] is None and out["metrics"]["cohen_kappa"]["value"] is None
    expected_f1 = f1_score(labels, probs.argmax(1), average="weighted", zero_division=0)
    assert out["metrics"]["weighted_f1"]["value"] == pytest.approx(expected_f1)
    for name in ("balanced_accuracy", "weighted_f1"):
        metric = out["metrics"][name]
        assert metric["ci_low"] <= metric["value"] <= metric["ci_high"], name


@pytest.mark.parametrize("n_classes", [2, 4])
def test_fast_replicate_metrics_equal_sklearn_with_ties(n_classes: int) -> None:
    from vlm.metrics import _fast_point, classification_point_metrics

    rng = np.random.default_rng(n_classes)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        labels = rng.integers(0, n_classes, size=n)
        labels[:2] = [0, 1]
        probs = rng.integers(0, 4, size=(n, n_classes)).astype(float) + 0.01  # coarse: many ties
        probs /= probs.sum(axis=1, keepdims=True)
        positive = 1 if trial % 2 else None
        fast = _fast_point(labels, probs, positive, n_classes)
        reference = classification_point_metrics(labels, probs, positive)
        assert fast == pytest.approx(reference, nan_ok=True), trial


def test_a_nan_pair_is_a_miss_not_a_hit() -> None:
    """NaN >= NaN is false: without care a NaN row ranks its own pair first, and a NaN model scores recall 1.0."""
    import torch

    from vlm.metrics import first_relevant_rank, recall_at_k, retrieval_recalls

    similarity = torch.eye(4)
    similarity[1, 1] = float("nan")
    assert recall_at_k(similarity, ks=(1, 4)) == {1: 0.75, 4: 0.75}
    nan_model = torch.full((4, 8), float("nan"))
    assert retrieval_recalls(nan_model, nan_model)["mean_recall"] == 0.0
    sim = np.eye(3)
    sim[2] = np.nan
    ranks = first_relevant_rank(sim, np.eye(3, dtype=bool))
    assert ranks[:2].tolist() == [0, 0] and ranks[2] >= 1000  # a miss at every K, even K > gallery size


def test_metrics_and_their_cis_do_not_depend_on_row_order() -> None:
    """The same predictions, read back in another order (a CSV, a notebook's merge), give the same CIs."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=30)
    probabilities = rng.dirichlet(np.ones(3), size=30)
    probabilities[labels == 0, 0] += 0.5  # some signal, so that CIs are not degenerate
    reference = classification_metrics(labels, probabilities, ["a", "b", "c"], n_boot=200, seed=0)
    for permutation_seed in range(3):
        order = np.random.default_rng(permutation_seed).permutation(30)
        again = classification_metrics(labels[order], probabilities[order], ["a", "b", "c"], n_boot=200, seed=0)
        assert again == reference

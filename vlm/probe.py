"""The supervised baseline beside zero-shot: a linear probe (logistic regression) on slide embeddings.

Zero-shot numbers mean little without the supervised reference that CONCH and TITAN report next to them.
`run_probe` fits scikit-learn's logistic regression on the slide embeddings of labelled training slides and
evaluates it on held-out slides with the same metrics (and bootstrap CIs) as `vlm zeroshot`:

- shot counts: `k` training slides per class drawn at random (one run per seed; the spread over seeds is
  reported) and `"all"` (every training slide, one run); each shot count's bootstrap CIs (over the test
  slides) are those of its run of median balanced accuracy (`metrics`, `metrics_seed`);
- regularisation: the inverse strength C is chosen from a log grid by stratified cross-validation on the
  training slides of that run only (balanced accuracy); with one slide per class no split is possible and
  C = 1 is used (recorded as `"C_source": "fixed"`);
- features are standardised with statistics of the training slides only.

Outputs in `out`: `metrics.json`, `predictions.csv` (one row per test slide, shot count and seed) and
`probe.png` (balanced accuracy against shots, zero-shot drawn as a line when its metrics file is given).

With `level="case"` (labels given per case; both label tables need `patient_id`): shots count cases per
class (all slides of a drawn case train, each with the case's label), cross-validation folds keep a case's
slides together, no patient may be in both tables, and each test case is scored by the mean of its slides'
logits (`vlm.case_level`); metrics and predictions.csv are per case.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlm.case_level import LEVELS, case_labels, mean_by_case, read_slide_cases, softmax
from vlm.errors import InputError, MissingInputError, UsageError
from vlm.formats.tables import read_table
from vlm.io import atomic_path, check_output_folder, claim_output_folder
from vlm.settings import N_BOOT

log = logging.getLogger(__name__)

METRICS = ("balanced_accuracy", "auroc", "weighted_f1")
DEFAULT_SHOTS: tuple[int | str, ...] = (1, 2, 4, 8, 16, "all")
C_GRID = tuple(float(c) for c in np.logspace(-3, 3, 7))
MAX_CV_FOLDS = 5


def parse_shots(values: Sequence[str | int]) -> list[int | str]:
    """`["1", "2", "all"]` -> `[1, 2, "all"]`; shot counts must be positive integers or `all`, each once."""
    shots: list[int | str] = []
    for value in values:
        text = str(value).strip().lower()
        if text == "all":
            shot: int | str = "all"
        else:
            try:
                shot = int(text)
            except ValueError:
                raise UsageError(f"`shots`: {value!r} is neither a positive integer nor 'all'") from None
            if shot < 1:
                raise UsageError(f"`shots`: {value!r} must be >= 1")
        if shot in shots:
            raise UsageError(f"`shots`: {value!r} given twice")
        shots.append(shot)
    if not shots:
        raise UsageError("`shots`: give at least one shot count (e.g. 1 2 4 8 16 all)")
    return shots


def _read_labels(path: str | os.PathLike[str], column: str) -> pd.Series:
    """slide_id -> label (str) from a table (`vlm.formats.tables`); refuses empty labels and duplicate ids."""
    frame = read_table(path, required=("slide_id", column), what="labels", all_text=True)
    frame["slide_id"] = frame["slide_id"].str.strip()
    frame[column] = frame[column].str.strip()
    duplicated = sorted(frame.loc[frame["slide_id"].duplicated(), "slide_id"].unique())
    if duplicated:
        raise InputError(f"{path}: slide ids listed more than once: {duplicated[:5]}")
    empty = frame.loc[frame[column] == "", "slide_id"].tolist()
    if empty:
        raise InputError(f"{path}: empty {column!r} for slide(s) {empty[:5]}; label them or drop the rows")
    return frame.set_index("slide_id")[column]


def _matrix(embeddings: dict[str, np.ndarray], labels: pd.Series, path: str | os.PathLike[str]) -> np.ndarray:
    missing = sorted(set(labels.index) - set(embeddings))
    if missing:
        raise InputError(
            f"{path}: {len(missing)} labelled slide(s) have no embedding in the slides parquet, e.g. {missing[:5]}; "
            "embed them with `vlm embed-slides` or drop them from the labels"
        )
    return np.stack([embeddings[s] for s in labels.index]).astype(np.float64)


def _logits(model: Any, x: np.ndarray) -> np.ndarray:
    """[N, C] logits whose softmax is the probe's `predict_proba` (binary: [0, decision])."""
    scores = model.decision_function(x)
    return np.stack([np.zeros_like(scores), scores], axis=1) if scores.ndim == 1 else scores


def _fit(x: np.ndarray, y: np.ndarray, seed: int, groups: np.ndarray | None = None) -> tuple[Any, float, str]:
    """Standardise + logistic regression with C chosen by stratified CV on (x, y) only; with `groups` (each
    row's case) a case's slides stay in one fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    if groups is None:
        folds = min(MAX_CV_FOLDS, int(np.bincount(y).min()))
    else:  # cases per class
        folds = min(MAX_CV_FOLDS, int(min(len(set(groups[y == c])) for c in np.unique(y))))
    if folds < 2:
        pipeline.set_params(logisticregression__C=1.0).fit(x, y)
        return pipeline, 1.0, "fixed"
    search = GridSearchCV(
        pipeline, {"logisticregression__C": list(C_GRID)}, scoring="balanced_accuracy",
        cv=(StratifiedKFold if groups is None else StratifiedGroupKFold)(folds, shuffle=True, random_state=seed),
        refit=True,
    )
    search.fit(x, y, groups=groups)
    return search.best_estimator_, float(search.best_params_["logisticregression__C"]), f"{folds}-fold CV"


def _sample(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k slides per class, drawn without replacement, in a canonical order."""
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), size=k, replace=False) for c in np.unique(y)]))


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _spread(values: list[float | None]) -> dict[str, float | None]:
    finite = np.array([v for v in values if v is not None], dtype=float)
    if finite.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": float(finite.mean()), "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
            "min": float(finite.min()), "max": float(finite.max())}


def run_probe(
    slides: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    test_labels: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    shots: Sequence[int | str] = DEFAULT_SHOTS,
    seeds: int = 5,
    zeroshot: str | os.PathLike[str] | None = None,
    label_column: str = "label",
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: str = "slide",
) -> dict[str, Any]:
    """Fit and evaluate the linear probe for each shot count (see the module docstring); return metrics.json."""
    from vlm.formats.embeddings import load_slide_embeddings
    from vlm.metrics import classification_metrics, classification_point_metrics

    shots = parse_shots(shots)
    if seeds < 1:
        raise UsageError(f"`seeds` must be >= 1, got {seeds}")
    if n_boot < 1:
        raise UsageError(f"`n_boot` must be >= 1, got {n_boot}")
    if level not in LEVELS:
        raise UsageError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    check_output_folder(out, "probe")  # before any work: a folder of the user's files is refused
    zeroshot_metrics = _read_zeroshot(zeroshot) if zeroshot is not None else None
    table = load_slide_embeddings(slides)
    embeddings = dict(zip(table.ids, table.embeddings.numpy(), strict=True))
    train_labels = _read_labels(labels, label_column)
    test = _read_labels(test_labels, label_column)
    leaked = sorted(set(train_labels.index) & set(test.index))
    if leaked:
        raise InputError(f"{len(leaked)} slide(s) are in both {labels} and {test_labels}, e.g. {leaked[:5]}; "
                         "a probe must never be tested on its training slides")
    by_case = level == "case"
    if by_case:  # every slide's case, one label per case, no patient on both sides
        train_cases, test_cases = read_slide_cases(labels), read_slide_cases(test_labels)
        case_labels(train_labels, train_cases, labels)
        test_case_labels = case_labels(test, test_cases, test_labels)
        both = sorted(set(train_cases.reindex(train_labels.index)) & set(test_cases.reindex(test.index)))
        if both:
            raise InputError(f"{len(both)} patient(s) have slides in both {labels} and {test_labels}, e.g. "
                             f"{both[:5]}; a probe must never be tested on its training cases")
    classes = sorted(train_labels.unique())
    if len(classes) < 2:
        raise InputError(f"{labels}: the probe needs at least two classes, found {classes}")
    unknown = sorted(set(test.unique()) - set(classes))
    if unknown:
        raise InputError(f"{test_labels}: label(s) {unknown} never occur in {labels} (classes: {classes})")
    train_only = sorted(set(classes) - set(test.unique()))
    if train_only:  # e.g. a spreadsheet's "NaN" or a typo: a class the test set cannot score
        log.warning("probe: %s: label(s) %s occur in no slide of %s; they stay classes of the probe",
                    labels, train_only, test_labels)
    test = test.sort_index()  # one canonical order: outputs do not depend on the files' row order
    train_labels = train_labels.sort_index()
    x_train, x_test = _matrix(embeddings, train_labels, slides), _matrix(embeddings, test, slides)
    table.check_finite([*train_labels.index, *test.index])  # NaN/inf rows named here, not deep in scikit-learn
    code = {name: i for i, name in enumerate(classes)}
    y_train = train_labels.map(code).to_numpy()
    y_test = test.map(code).to_numpy()
    # the unit shots count and CV folds keep together: each training slide's case (or the slide itself)
    groups = train_cases.reindex(train_labels.index).to_numpy() if by_case else train_labels.index.to_numpy()
    unit_names, unit_of_row = np.unique(groups, return_inverse=True)
    y_unit = np.zeros(len(unit_names), dtype=np.int64)
    y_unit[unit_of_row] = y_train
    counts = np.bincount(y_unit, minlength=len(classes))
    smallest, rarest = int(counts.min()), classes[int(counts.argmin())]
    unit = "cases" if by_case else "slides"
    if by_case:
        case_ids, members, _ = mean_by_case(list(test.index), test_cases, np.zeros((len(test), 1)))
        y_eval = test_case_labels.reindex(case_ids).map(code).to_numpy()
    else:
        y_eval = y_test
    positive = 1 if len(classes) == 2 else None
    if all(shot != "all" and shot > smallest for shot in shots):  # nothing would run: an empty report, exit 0
        per_class = ", ".join(f"{name!r}: {int(n)}" for name, n in zip(classes, counts, strict=True))
        raise InputError(
            f"{labels}: no requested shot count ({' '.join(map(str, shots))}) can be drawn: class {rarest!r} has "
            f"{smallest} training {unit} ({per_class}); ask for `shots` {smallest} or fewer, or 'all', or label "
            "more slides; nothing was written"
        )

    results: list[dict[str, Any]] = []
    rows: list[pd.DataFrame] = []
    for shot in shots:
        if shot != "all" and shot > smallest:
            log.warning("probe: %s-shot skipped: class %r has %d training %s", shot, rarest, smallest, unit)
            results.append({"shots": shot, "skipped": f"class {rarest!r} has only {smallest} training {unit}"})
            continue
        run_seeds = [seed] if shot == "all" else [seed + i for i in range(seeds)]
        runs: list[dict[str, Any]] = []
        probabilities_of: dict[int, np.ndarray] = {}
        for run_seed in run_seeds:
            rng = np.random.default_rng(run_seed)
            if shot == "all":
                chosen = np.arange(len(y_train))
            elif by_case:  # k cases per class, each with all its slides
                chosen = np.flatnonzero(np.isin(unit_of_row, _sample(y_unit, int(shot), rng)))
            else:
                chosen = _sample(y_train, int(shot), rng)
            model, c_value, c_source = _fit(
                x_train[chosen], y_train[chosen], run_seed, groups[chosen] if by_case else None
            )
            if by_case:  # each case: softmax of the mean of its slides' logits
                probabilities = softmax(mean_by_case(list(test.index), test_cases, _logits(model, x_test))[2])
            else:
                probabilities = model.predict_proba(x_test)
            point = classification_point_metrics(y_eval, probabilities, positive)
            runs.append({
                "seed": run_seed, "n_train": int(len(chosen)), "C": c_value, "C_source": c_source,
                "metrics": {name: {"value": _finite(point[name])} for name in METRICS},
            })
            probabilities_of[run_seed] = probabilities
            frame = pd.DataFrame(probabilities, columns=[f"p_{name}" for name in classes])
            if by_case:
                frame.insert(0, "patient_id", case_ids)
                frame.insert(1, "slide_ids", [";".join(m) for m in members])
            else:
                frame.insert(0, "slide_id", list(test.index))
            frame.insert(frame.columns.get_loc(f"p_{classes[0]}"), "shots", str(shot))
            frame.insert(frame.columns.get_loc(f"p_{classes[0]}"), "seed", run_seed)
            frame["label"] = [classes[i] for i in y_eval]
            frame["predicted"] = [classes[i] for i in probabilities.argmax(axis=1)]
            rows.append(frame)
        # Bootstrap CIs (over test slides) for the run of median balanced accuracy: the spread over seeds is
        # the other half of the uncertainty, and one bootstrap per shot count keeps the demo fast.
        order = sorted(runs, key=lambda r: (r["metrics"]["balanced_accuracy"]["value"] or 0.0, r["seed"]))
        median = order[(len(order) - 1) // 2]
        evaluation = classification_metrics(y_eval, probabilities_of[median["seed"]], classes, positive=positive,
                                            n_boot=n_boot, seed=seed)
        results.append({
            "shots": shot, "n_runs": len(runs), "runs": runs,
            "metrics": {name: evaluation["metrics"][name] for name in METRICS}, "metrics_seed": median["seed"],
            "spread": {name: _spread([r["metrics"][name]["value"] for r in runs]) for name in METRICS},
        })
        log.info("probe: %s-shot balanced accuracy %.3f (mean over %d run(s))", shot,
                 results[-1]["spread"]["balanced_accuracy"]["mean"] or float("nan"), len(runs))
    report = {
        "slides": str(slides), "labels": str(labels), "test_labels": str(test_labels), "classes": classes,
        "level": level, "n_train": int(len(y_train)), "n_test": int(len(y_eval)),
        **({"n_train_cases": len(unit_names), "n_test_slides": len(y_test)} if by_case else {}),
        "support_test": {name: int((y_eval == i).sum()) for i, name in enumerate(classes)},
        "model": "StandardScaler + LogisticRegression (scikit-learn), C from "
                 f"{list(C_GRID)} by stratified CV on the training slides (balanced accuracy)",
        "bootstrap": {"n_boot": n_boot, "seed": seed, "method": "percentile, stratified, over test slides"},
        "shots": results,
        "zeroshot": zeroshot_metrics,
    }
    _write(Path(out), report, rows)
    return report


def _read_zeroshot(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metrics (value and CI) of a `vlm zeroshot` metrics.json, for the plot and the report."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no zero-shot metrics.json (written by `vlm zeroshot --labels`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        metrics = {name: data["metrics"][name] for name in METRICS if name in data["metrics"]}
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a `vlm zeroshot` metrics.json ({error})") from error
    return {"file": str(path), "n": data.get("n"), "metrics": metrics}


def _write(out: Path, report: dict[str, Any], rows: list[pd.DataFrame]) -> None:
    predictions = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    figure = probe_png(report)
    with claim_output_folder(out, "probe"):
        with atomic_path(out / "predictions.csv") as tmp:
            predictions.to_csv(tmp, index=False, float_format="%.6g")
        with atomic_path(out / "probe.png") as tmp:
            tmp.write_bytes(figure)
        with atomic_path(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def probe_png(report: dict[str, Any], metric: str = "balanced_accuracy") -> bytes:
    """`metric` against shots: every seed's run as a dot, the mean as a line, zero-shot as a horizontal line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from vlm.plots import _png

    done = [entry for entry in report["shots"] if "runs" in entry]
    figure = Figure(figsize=(5.2, 3.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(done))
    means = [entry["spread"][metric]["mean"] for entry in done]
    for x, entry in zip(positions, done, strict=True):
        values = [run["metrics"][metric]["value"] for run in entry["runs"]]
        axes.scatter([x] * len(values), values, color="C0", alpha=0.5, s=18)
    axes.plot(positions, [np.nan if m is None else m for m in means], color="C0", marker="o",
              label="linear probe (mean over seeds)")
    zs = (report.get("zeroshot") or {}).get("metrics", {}).get(metric)
    if zs and zs.get("value") is not None:
        axes.axhline(zs["value"], color="C3", linestyle="--", label=f"zero-shot ({zs['value']:.3f})")
        if zs.get("ci_low") is not None:
            axes.axhspan(zs["ci_low"], zs["ci_high"], color="C3", alpha=0.12, label="zero-shot 95 % CI")
    axes.set_xticks(positions, [str(entry["shots"]) for entry in done])
    axes.set(xlabel="training slides per class (shots)", ylabel=metric.replace("_", " "), ylim=(0, 1.02))
    axes.set_title(f"supervised baseline vs zero-shot, n test = {report['n_test']}", fontsize=10)
    axes.legend(loc="lower right", fontsize=8)
    return _png(figure)

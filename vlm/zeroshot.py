"""`vlm zeroshot`: a prompt task over a cohort's slides -> predictions, metrics and figures (`run_zeroshot`).

The classifier itself (prototypes, scoring, the prompt cache) lives beside the model in
`vlm.model.zeroshot`, shared with heatmaps and the viewer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from vlm.case_level import LEVELS, case_labels, mean_by_case, read_slide_cases, softmax
from vlm.errors import InputError, UsageError
from vlm.formats.embeddings import SlideEmbeddings
from vlm.formats.tables import read_table
from vlm.io import atomic_path, check_output_folder, claim_output_folder
from vlm.model.clip import SlideTextModel
from vlm.model.zeroshot import (
    ZeroShotClassifier,
    _refuse_non_finite,
    default_cache_dir,
)
from vlm.prompts import PromptTask, load_prompt_task, task_from_classes
from vlm.settings import N_BOOT, PRECISIONS

log = logging.getLogger(__name__)


# --- the `vlm zeroshot` job ---------------------------------------------------------------------------

LABEL_OUTPUTS = ("metrics.json", "roc.png", "confusion.png")


def load_embeddings(embeddings: str | os.PathLike[str] | SlideEmbeddings) -> tuple[list[str], np.ndarray]:
    """Slide ids and unprojected embeddings [N, E] of a `vlm embed-slides` parquet, or of one already loaded.

    A folder of tile features is refused with the fix: it is embedded first (`vlm embed-slides`, or
    `vlm zeroshot --features`, which embeds it with the model's own slide encoder).
    """
    from vlm.formats.embeddings import load_slide_embeddings

    if isinstance(embeddings, SlideEmbeddings):
        return list(embeddings.ids), embeddings.embeddings.float().numpy()
    if Path(embeddings).is_dir():
        raise InputError(
            f"{embeddings} is a folder, not a slide-embeddings parquet: embed its tile features first "
            f"(`vlm embed-slides {embeddings} --out slides.parquet`), or give it as `vlm zeroshot --features`"
        )
    table = load_slide_embeddings(embeddings)
    return table.ids, table.embeddings.numpy()


def read_labels(path: str | os.PathLike[str], task: PromptTask, column: str | None = None) -> tuple[pd.Series, str]:
    """slide_id -> raw label (str) from a table (`vlm.formats.tables`): `column`, else the task's label column,
    else `label`.

    The task's column is a vlm task's `labels.column`, a TITAN config's `target`, or `OncoTreeCode` for
    CONCH / MI-Zero files (the column their code reads).
    """
    path = Path(path)
    frame = read_table(path, required=("slide_id",), what="labels", all_text=True)
    if column is None:
        column = task.label_column if task.label_column in frame.columns else "label"
        if column != task.label_column and column in frame.columns:
            log.warning(
                "%s has no column %r (the task's label column); reading labels from 'label'", path, task.label_column
            )
    if column not in frame.columns:
        raise InputError(f"{path}: no label column {column!r} (columns: {list(frame.columns)}); pass `label_column`")
    duplicated = frame["slide_id"][frame["slide_id"].duplicated()].unique().tolist()
    if duplicated:
        raise InputError(f"{path}: slide ids listed more than once: {duplicated[:5]}")
    return frame.set_index("slide_id")[column].str.strip(), column


def match_labels(
    slide_ids: Sequence[str], raw: pd.Series, task: PromptTask, allow_missing_slides: bool = False
) -> tuple[np.ndarray, dict[str, Any]]:
    """Class index per slide (-1 when not evaluable) and a report of every slide or label left out.

    Slides without a label, labels that map to no class, and labelled slides that were not scored are all
    listed (and logged), never dropped silently. Labelled slides missing from the scored set are an error
    unless `allow_missing_slides`, since they usually mean the wrong embeddings file.
    """
    scored = set(slide_ids)
    not_scored = sorted(set(raw.index) - scored)
    if not_scored and not allow_missing_slides:
        raise InputError(
            f"{len(not_scored)} slide id(s) in the labels file are not among the scored slides "
            f"(e.g. {not_scored[:5]}); check `embeddings`, or pass `allow_missing_slides` to evaluate the rest"
        )
    targets = np.full(len(slide_ids), -1, dtype=np.int64)
    unlabelled, unknown = [], {}
    for row, slide_id in enumerate(slide_ids):
        value = raw.get(slide_id)
        if value is None or value == "":
            unlabelled.append(slide_id)
            continue
        code = task.label_to_class(value)
        if code is None:
            unknown[slide_id] = value
            continue
        targets[row] = task.classes.index(code)
    for what, items in (
        ("have no label", unlabelled),
        ("have a label that is no class", list(unknown)),
        ("in the labels file were not scored", not_scored),
    ):
        if items:
            log.warning("%d slide(s) %s and are left out of the metrics (e.g. %s)", len(items), what, items[:5])
    if unknown:
        log.warning(
            "unknown label values: %s; classes are %s (map others under labels.map in the task file)",
            sorted(set(unknown.values()))[:10],
            list(task.classes),
        )
    report = {
        "n_scored": len(slide_ids),
        "n_evaluated": int((targets >= 0).sum()),
        "unlabelled_slides": unlabelled,
        "unknown_labels": unknown,
        "labels_without_slides": not_scored,
    }
    return targets, report


def _prompt_set_summary(per_set: Sequence[np.ndarray], targets: np.ndarray, task: PromptTask) -> dict[str, Any]:
    """MI-Zero style: each prompt set's point metrics, and their median, quartiles and range."""
    from vlm.metrics import classification_point_metrics

    mask = targets >= 0
    rows = [classification_point_metrics(targets[mask], p[mask], task.positive_index) for p in per_set]
    summary = {}
    for name in rows[0]:
        values = np.array([row[name] for row in rows], dtype=float)
        values = values[np.isfinite(values)]
        if values.size:
            q25, median, q75 = np.percentile(values, [25, 50, 75])
            summary[name] = {
                "median": median,
                "q25": q25,
                "q75": q75,
                "min": values.min(),
                "max": values.max(),
            }
    summary = {k: {s: float(v) for s, v in d.items()} for k, d in summary.items()}
    return {"n_sets": len(rows), "summary": summary, "per_set": rows}


def _median_metrics(sets: dict[str, Any], pooled: dict[str, Any]) -> dict[str, Any]:
    """The MI-Zero headline: per metric, the median over prompt sets (value) and its spread; no CI."""
    out = {}
    for name in pooled:
        spread = sets["summary"].get(name)
        out[name] = {
            "value": None if spread is None else spread["median"],
            "ci_low": None,
            "ci_high": None,
            **({k: spread[k] for k in ("q25", "q75", "min", "max")} if spread else {}),
        }
    return out


@dataclass
class ZeroShotResult:
    """What a zero-shot run computed, held in memory: `write_zeroshot` turns it into the run folder.

    Rows are slides, or cases with `level="case"` (`members` then lists each case's slides).
    """

    task: PromptTask
    level: str
    ids: list[str]  # slide ids, or patient ids at level "case"
    probabilities: np.ndarray  # [N, C], columns in task.classes order
    predictions: pd.DataFrame  # predictions.csv: id column(s), one probability column per class, predicted[, label]
    prompts_used: dict[str, Any]  # prompts_used.json
    run: dict[str, Any]  # run.json: settings and provenance
    targets: np.ndarray | None = None  # class index per row (-1: not evaluable); None without labels
    metrics: dict[str, Any] | None = None  # metrics.json; None without labels
    members: list[list[str]] | None = None  # each case's slides (level "case")

    @property
    def predicted(self) -> list[str]:
        """The predicted class code of each row."""
        return list(self.predictions["predicted"])

    def summary(self) -> dict[str, Any]:
        """The metrics, or without labels the run settings: what `run_zeroshot` returns."""
        return self.metrics or self.run


@dataclass
class _Request:
    """The checked inputs of a zero-shot run: read before any model, embedding or output is touched."""

    task: PromptTask
    level: str
    labels: str | os.PathLike[str] | None
    raw_labels: tuple[pd.Series, str] | None  # label per slide (per case at level "case"), and its column
    slide_cases: Any = None  # slide -> case (level "case"), from the labels' patient_id column


def _check_request(
    task: str | os.PathLike[str] | PromptTask | None,
    classes: Sequence[str] | Mapping[str, Sequence[str]] | None,
    positive: str | None,
    labels: str | os.PathLike[str] | None,
    label_column: str | None,
    level: str,
    n_boot: int,
    precision: str,
) -> _Request:
    """Every argument checked and the prompt task and labels read, so that a bad one fails before any work."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if (task is None) == (classes is None):
        raise InputError("give exactly one of `task` (a prompt file) or `classes` (CODE=synonym ...)")
    if positive is not None and task is not None:
        raise InputError("`positive` goes with `classes`; a task file names its positive class itself")
    if n_boot < 1:
        raise UsageError(f"`n_boot` must be >= 1, got {n_boot}")
    if isinstance(task, PromptTask):
        prompt_task = task
    elif task is not None:
        prompt_task = load_prompt_task(task)
    else:
        prompt_task = task_from_classes(classes, positive=positive)
    raw_labels = read_labels(labels, prompt_task, label_column) if labels is not None else None
    if level not in LEVELS:
        raise UsageError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    if level == "case" and labels is None:
        raise InputError("`level` case needs `labels` with a patient_id column naming each slide's case")
    slide_cases = read_slide_cases(labels) if level == "case" and labels is not None else None
    if slide_cases is not None and raw_labels is not None:  # one label per case, checked before any work
        raw_labels = (case_labels(raw_labels[0], slide_cases, labels), raw_labels[1])
    return _Request(prompt_task, level, labels, raw_labels, slide_cases)


def _score(
    classifier: ZeroShotClassifier, request: _Request, slide_ids: list[str], embeddings: np.ndarray, source: str
) -> tuple[list[str], list[list[str]] | None, np.ndarray, Any]:
    """Row ids, case members, probabilities [N, C] and a function giving each prompt set's probabilities."""
    cases = request.slide_cases
    if cases is None:
        probabilities = classifier.predict(embeddings, ids=slide_ids, source=source)  # [N, C]; refuses NaN, width

        def per_set() -> list[np.ndarray]:
            return classifier.predict_per_set(embeddings, ids=slide_ids)

        return slide_ids, None, probabilities, per_set
    logits = classifier.predict(embeddings, ids=slide_ids, source=source, logits=True)  # one row per case:
    case_ids, members, case_logits = mean_by_case(slide_ids, cases, logits)  # softmax of its slides' mean logits

    def per_set_cases() -> list[np.ndarray]:
        sets = classifier.predict_per_set(embeddings, ids=slide_ids, logits=True)
        return [softmax(mean_by_case(slide_ids, cases, s)[2]) for s in sets]

    return case_ids, members, softmax(case_logits), per_set_cases


def _evaluate(
    request: _Request, ids: list[str], probabilities: np.ndarray, per_set: Any, n_sets: int,
    allow_missing_slides: bool, n_boot: int, seed: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Class index per row and the metrics.json content: pooled metrics with CIs, or MI-Zero's median."""
    from vlm.metrics import classification_metrics

    task, (raw, column) = request.task, request.raw_labels
    targets, label_report = match_labels(ids, raw, task, allow_missing_slides)
    mask = targets >= 0
    if not mask.any():
        raise InputError(
            f"none of the {len(ids)} scored {request.level}s has a usable label in {request.labels} "
            f"(column {column!r}); the classes are {list(task.classes)}"
        )
    pooled = classification_metrics(targets[mask], probabilities[mask], task.classes,
                                    positive=task.positive_index, n_boot=n_boot, seed=seed)
    metrics = {"level": request.level, "task": task.name, "labels": str(request.labels), "label_column": column,
               "headline": _headline(n_sets), **label_report}
    if not n_sets:
        return targets, {**metrics, **pooled}
    sets = _prompt_set_summary(per_set(), targets, task)  # MI-Zero: each set a classifier, headline their median
    metrics.update({key: pooled[key] for key in ("n", "support", "classes_without_cases", "positive")},
                   metrics=_median_metrics(sets, pooled["metrics"]), prompt_sets=sets,
                   pooled_ensemble=pooled)
    return targets, metrics


def _headline(n_sets: int) -> str:
    return "median_over_prompt_sets" if n_sets else "prompt_ensemble"


def _predictions(
    task: PromptTask, ids: list[str], members: list[list[str]] | None, probabilities: np.ndarray,
    targets: np.ndarray | None,
) -> pd.DataFrame:
    """predictions.csv: one row per slide (or case with its slide_ids), probabilities, predicted[, label]."""
    frame = pd.DataFrame(probabilities, columns=list(task.classes))
    if members is None:
        frame.insert(0, "slide_id", ids)
    else:
        frame.insert(0, "patient_id", ids)
        frame.insert(1, "slide_ids", [";".join(m) for m in members])
    frame["predicted"] = [task.classes[i] for i in probabilities.argmax(axis=1)]
    if targets is not None:
        frame["label"] = [task.classes[t] if t >= 0 else "" for t in targets]
    return frame


def _compute(
    model: SlideTextModel, embeddings: str | os.PathLike[str] | SlideEmbeddings, request: _Request, *,
    record: dict[str, Any], allow_missing_slides: bool, cache_dir: str | os.PathLike[str] | None, use_cache: bool,
    n_boot: int, seed: int,
) -> ZeroShotResult:
    """Score the checked request; `record` holds the run.json entries the caller knows (model, source, device)."""
    from vlm import __version__

    slide_ids, vectors = load_embeddings(embeddings)
    source = record["slides"]
    _refuse_non_finite(torch.as_tensor(vectors), slide_ids, "slide embedding", source=source)
    classifier = ZeroShotClassifier(model, request.task, cache_dir=cache_dir, use_cache=use_cache)
    ids, members, probabilities, per_set = _score(classifier, request, slide_ids, vectors, source)
    n_sets = len(classifier.set_prototypes)
    targets = metrics = None
    if request.raw_labels is not None:
        targets, metrics = _evaluate(request, ids, probabilities, per_set, n_sets, allow_missing_slides, n_boot, seed)
    task = request.task
    run = {
        "vlm_version": __version__, "model": record["model"], "slides": source, "task": task.source,
        "task_name": task.name, "classes": list(task.classes), "positive": task.positive,
        "labels": None if request.labels is None else str(request.labels),
        "label_column": None if request.raw_labels is None else request.raw_labels[1],
        "prompt_sets": n_sets or 1, "headline": _headline(n_sets),
        "predictions": "pooled ensemble of all prompt sets" if n_sets else "prompt ensemble",
        "device": record["device"], "precision": record["precision"], "level": request.level,
        "n_slides": len(slide_ids), **({"n_cases": len(ids)} if members is not None else {}),
        "n_boot": n_boot, "seed": seed, "logit_scale": float(model.scale().detach()),
        "text_fingerprint": classifier.text_fingerprint,
        "cache": str(cache_dir or default_cache_dir()) if use_cache else None,
    }
    return ZeroShotResult(task, request.level, ids, probabilities, _predictions(task, ids, members, probabilities,
                          targets), classifier.prompts_used(), run, targets, metrics, members)


def _load_model(model: str | os.PathLike[str] | SlideTextModel, device: torch.device) -> tuple[SlideTextModel, str]:
    """The model and how run.json names it."""
    if isinstance(model, SlideTextModel):
        return model, "<in memory>"
    return SlideTextModel.from_pretrained(model, device=device), str(model)


def classify_zero_shot(
    model: str | os.PathLike[str] | SlideTextModel,
    embeddings: str | os.PathLike[str] | SlideEmbeddings,
    *,
    task: str | os.PathLike[str] | PromptTask | None = None,
    classes: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    positive: str | None = None,
    labels: str | os.PathLike[str] | None = None,
    label_column: str | None = None,
    allow_missing_slides: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    n_boot: int = N_BOOT,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    precision: str = "auto",
    level: str = "slide",
) -> ZeroShotResult:
    """Zero-shot classify slide embeddings (a parquet or a loaded `SlideEmbeddings`) with a prompt task, in memory.

    The computing part of `run_zeroshot`, for notebooks: the same predictions and, with `labels`, the same
    metrics, and no files (`write_zeroshot` writes them). `task` is a prompt file or a shipped task's name;
    `classes` the alternative `{code: synonyms}`. `precision` is recorded; scoring runs in fp32.
    """
    from vlm.device import resolve_device

    request = _check_request(task, classes, positive, labels, label_column, level, n_boot, precision)
    resolved = resolve_device(device)
    loaded, model_source = _load_model(model, resolved)
    record = {"model": model_source, "slides": _source(embeddings), "device": str(resolved), "precision": precision}
    return _compute(loaded, embeddings, request, record=record, allow_missing_slides=allow_missing_slides,
                    cache_dir=cache_dir, use_cache=use_cache, n_boot=n_boot, seed=seed)


def _source(embeddings: Any) -> str:
    return "<in memory>" if isinstance(embeddings, SlideEmbeddings) else str(embeddings)


def write_zeroshot(result: ZeroShotResult, out: str | os.PathLike[str]) -> None:
    """Write a result's run folder: predictions.csv, prompts_used.json, run.json and, with labels, metrics.json,
    roc.png and confusion.png (each atomically, all rendered first); label outputs of an earlier run are
    removed when this one has none."""
    from vlm.plots import confusion_png, roc_png

    out = Path(out)
    files: dict[str, bytes] = {}
    if result.metrics is not None and result.targets is not None:
        task, mask = result.task, result.targets >= 0
        n_sets = result.metrics.get("prompt_sets", {}).get("n_sets", 0)
        title = f"{task.name} (pooled ensemble of {n_sets} prompt sets)" if n_sets else task.name
        pooled = result.metrics.get("pooled_ensemble", result.metrics)
        files["metrics.json"] = (json.dumps(result.metrics, indent=2) + "\n").encode()
        files["roc.png"] = roc_png(result.targets[mask], result.probabilities[mask], task.classes,
                                   task.positive_index, title=title)
        files["confusion.png"] = confusion_png(np.array(pooled["confusion_matrix"]["counts"]), task.classes,
                                               title=title)
    files["predictions.csv"] = result.predictions.to_csv(index=False, float_format="%.6g").encode()
    files["prompts_used.json"] = (json.dumps(result.prompts_used, indent=2) + "\n").encode()
    files["run.json"] = (json.dumps(result.run, indent=2) + "\n").encode()
    with claim_output_folder(out, "zeroshot"):  # a folder of the user's own files is refused
        for name, content in files.items():
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(content)
        for stale in set(LABEL_OUTPUTS) - set(files):
            if (out / stale).exists():
                (out / stale).unlink()
                log.info("removed %s from an earlier run (this run has no labels)", out / stale)


# `embed(model, parquet, device, precision, progress)`: writes the slide embeddings of the model's own slide encoder
# to parquet (`vlm zeroshot --features`).
Embed = Callable[[SlideTextModel, Path, torch.device, str, bool], None]


def run_zeroshot(
    model: str | os.PathLike[str] | SlideTextModel,
    embeddings: str | os.PathLike[str] | SlideEmbeddings,
    out: str | os.PathLike[str],
    *,
    task: str | os.PathLike[str] | PromptTask | None = None,
    classes: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    positive: str | None = None,
    labels: str | os.PathLike[str] | None = None,
    label_column: str | None = None,
    allow_missing_slides: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    n_boot: int = N_BOOT,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    precision: str = "auto",
    progress: bool = True,
    level: str = "slide",
    embed: Embed | None = None,
) -> dict[str, Any]:
    """The `vlm zeroshot` job: check every input, compute (`classify_zero_shot`), write the run folder `out`
    (`write_zeroshot`).

    predictions.csv has slide_id, one probability column per class, predicted[, label]; with `level="case"`
    one row per case (patient_id, slide_ids, probabilities of the mean of its slides' logits,
    `vlm.case_level`; cases from the labels' patient_id column, metrics over cases). Every input is checked
    and every result computed before the first file is written, so a bad input leaves no partial output.
    `embed`, when given, makes the slide embeddings once the inputs are checked and `out` is claimed:
    `embeddings` is then the folder of tile features it embeds into `out/slide_embeddings.parquet` (which a
    re-run resumes; `vlm zeroshot --features`), with progress bars if `progress`. Returns the metrics (or,
    without labels, the run settings).
    """
    from vlm.device import resolve_device

    request = _check_request(task, classes, positive, labels, label_column, level, n_boot, precision)
    out = Path(out)
    check_output_folder(out, "zeroshot")  # before any work: a folder of the user's files is refused
    resolved = resolve_device(device)
    loaded, model_source = _load_model(model, resolved)
    record = {"model": model_source, "slides": _source(embeddings), "device": str(resolved), "precision": precision}
    with claim_output_folder(out, "zeroshot"):
        if embed is not None:
            embed(loaded, out / "slide_embeddings.parquet", resolved, precision, progress)
            embeddings = out / "slide_embeddings.parquet"
        result = _compute(loaded, embeddings, request, record=record, allow_missing_slides=allow_missing_slides,
                          cache_dir=cache_dir, use_cache=use_cache, n_boot=n_boot, seed=seed)
        write_zeroshot(result, out)
    log.info("zeroshot: %d slides, %d classes -> %s", result.run["n_slides"], len(result.task.classes), out)
    return result.summary()

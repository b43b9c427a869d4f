"""`vlm zeroshot`: a prompt task over a cohort's slides -> predictions, metrics and figures (`run_zeroshot`).

The classifier itself (prototypes, scoring, the prompt cache) lives beside the model in
`vlm.model.zeroshot`, shared with heatmaps and the viewer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from vlm.case_level import LEVELS, case_labels, mean_by_case, read_slide_cases, softmax
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
from vlm.settings import N_BOOT

log = logging.getLogger(__name__)


# --- the `vlm zeroshot` job ---------------------------------------------------------------------------

LABEL_OUTPUTS = ("metrics.json", "roc.png", "confusion.png")


def read_slides(
    slides: str | os.PathLike[str] | SlideEmbeddings,
    model: SlideTextModel,
    out: Path,
    device: torch.device,
    progress: bool = True,
    precision: str = "auto",
    mpp: float | None = None,
    patches: str | os.PathLike[str] | None = None,
) -> tuple[list[str], np.ndarray]:
    """Slide ids and unprojected embeddings [N, E] from a `vlm embed-slides` parquet or a features folder.

    A features folder is embedded with the model's own slide encoder into `out/slide_embeddings.parquet`
    (resumable); a model trained on cached embeddings has none, and the error says what to run instead.
    `mpp` / `patches` are `vlm embed-slides`' `--mpp` / `--patches` for that folder.
    An in-memory `SlideEmbeddings` (from `load_slide_embeddings`) is used as it is.
    """
    from vlm.formats.embeddings import load_slide_embeddings

    if isinstance(slides, SlideEmbeddings):
        return list(slides.ids), slides.embeddings.float().numpy()
    path = Path(slides)
    if path.is_dir():
        from vlm.formats.features import feature_files
        from vlm.slide_embeddings import embed_slides

        if model.slide_encoder is None:
            raise ValueError(
                f"--slides {path} is a folder of tile features, but this model has no slide encoder (it "
                "was trained on cached slide embeddings). Embed the slides with the slide encoder the model "
                f"was trained on, `vlm embed-slides {path} --out slides.parquet`, then pass "
                "--slides slides.parquet"
            )
        target = out / "slide_embeddings.parquet"
        log.info("embedding %s with the model's slide encoder into %s", path, target)
        report = embed_slides(
            feature_files(path),
            target,
            model.slide_encoder,
            pool=model.config.pool,
            device=device,
            precision=precision,
            progress=progress,
            mpp=mpp,
            patches=patches,
        )
        if report.failed:
            log.error("%d slides failed to embed (listed in %s) and are not scored", len(report.failed), out)
        path = target
    table = load_slide_embeddings(path)
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
        raise ValueError(f"{path}: no label column {column!r} (columns: {list(frame.columns)}); pass --label-column")
    duplicated = frame["slide_id"][frame["slide_id"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"{path}: slide ids listed more than once: {duplicated[:5]}")
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
        raise ValueError(
            f"{len(not_scored)} slide id(s) in the labels file are not among the scored slides "
            f"(e.g. {not_scored[:5]}); check --slides, or pass --allow-missing-slides to evaluate the rest"
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


def run_zeroshot(
    model: str | os.PathLike[str] | SlideTextModel,
    slides: str | os.PathLike[str] | SlideEmbeddings,
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
    progress: bool = True,
    precision: str = "auto",
    mpp: float | None = None,
    patches: str | os.PathLike[str] | None = None,
    level: str = "slide",
) -> dict[str, Any]:
    """The `vlm zeroshot` job: score slides against a prompt task and write the run folder `out`.

    Writes predictions.csv (slide_id, one probability column per class, predicted[, label]),
    or with `level="case"` one row per case (patient_id, slide_ids, probabilities of the mean of its slides'
    logits, `vlm.case_level`; cases from the labels' patient_id column, metrics over cases),
    prompts_used.json, run.json and, with `labels`, metrics.json, roc.png and confusion.png. Every input
    is checked and every result computed before the first file is written (each atomically), so a bad
    input leaves no partial output; only a features folder given as `slides` is first embedded into
    `out/slide_embeddings.parquet`, which a re-run resumes. `slides` may also be a `SlideEmbeddings` already
    in memory; `task` a shipped task's name. Returns the metrics (or, without labels, the run settings).
    """
    from vlm import __version__
    from vlm.device import resolve_device
    from vlm.metrics import classification_metrics
    from vlm.plots import confusion_png, roc_png

    if (task is None) == (classes is None):
        raise ValueError("give exactly one of --task (a prompt file) or --classes (CODE=synonym ...)")
    if positive is not None and task is not None:
        raise ValueError("--positive goes with --classes; a task file names its positive class itself")
    if n_boot < 1:
        raise ValueError(f"--n-boot must be >= 1, got {n_boot}")
    if isinstance(task, PromptTask):
        prompt_task = task
    elif task is not None:
        prompt_task = load_prompt_task(task)
    else:
        prompt_task = task_from_classes(classes, positive=positive)
    out = Path(out)
    check_output_folder(out, "zeroshot")  # before any work: a folder of the user's files is refused
    resolved = resolve_device(device)
    if not isinstance(model, SlideTextModel):
        model_source = str(model)
        model = SlideTextModel.from_pretrained(model, device=resolved)
    else:
        model_source = "<in memory>"
    raw_labels = read_labels(labels, prompt_task, label_column) if labels is not None else None
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    if level == "case" and labels is None:
        raise ValueError("--level case needs --labels with a patient_id column naming each slide's case")
    slide_cases = read_slide_cases(labels) if level == "case" and labels is not None else None
    if slide_cases is not None and raw_labels is not None:  # one label per case, checked before any work
        raw_labels = (case_labels(raw_labels[0], slide_cases, labels), raw_labels[1])

    with claim_output_folder(out, "zeroshot"):
        slide_ids, embeddings = read_slides(
            slides, model, out, resolved, progress=progress, precision=precision, mpp=mpp, patches=patches
        )
        _refuse_non_finite(torch.as_tensor(embeddings), slide_ids, "slide embedding", source=str(slides))
        classifier = ZeroShotClassifier(model, prompt_task, cache_dir=cache_dir, use_cache=use_cache)
        scored_slides = slide_ids
        if slide_cases is None:
            probabilities = classifier.predict(
                embeddings, ids=slide_ids, source=slides
            )  # [N, C]; refuses width mismatch, NaN

            def per_set() -> list[np.ndarray]:
                return classifier.predict_per_set(embeddings, ids=slide_ids)
        else:  # one row per case: softmax of the mean of its slides' logits
            logits = classifier.predict(embeddings, ids=slide_ids, source=slides, logits=True)
            slide_ids, members, case_logits = mean_by_case(scored_slides, slide_cases, logits)
            probabilities = softmax(case_logits)

            def per_set() -> list[np.ndarray]:
                sets = classifier.predict_per_set(embeddings, ids=scored_slides, logits=True)
                return [softmax(mean_by_case(scored_slides, slide_cases, s)[2]) for s in sets]
        if raw_labels is not None:
            targets, label_report = match_labels(slide_ids, raw_labels[0], prompt_task, allow_missing_slides)
        predictions = pd.DataFrame(probabilities, columns=list(prompt_task.classes))
        if slide_cases is None:
            predictions.insert(0, "slide_id", slide_ids)
        else:
            predictions.insert(0, "patient_id", slide_ids)
            predictions.insert(1, "slide_ids", [";".join(m) for m in members])
        predictions["predicted"] = [prompt_task.classes[i] for i in probabilities.argmax(axis=1)]
        n_sets = len(classifier.set_prototypes)
        headline = "median_over_prompt_sets" if n_sets else "prompt_ensemble"
        title = f"{prompt_task.name} (pooled ensemble of {n_sets} prompt sets)" if n_sets else prompt_task.name

        files: dict[str, bytes] = {}
        result: dict[str, Any] = {}
        if raw_labels is not None:
            predictions["label"] = [prompt_task.classes[t] if t >= 0 else "" for t in targets]
            mask = targets >= 0
            if not mask.any():
                raise ValueError(
                    f"none of the {len(slide_ids)} scored {level}s has a usable label in {labels} "
                    f"(column {raw_labels[1]!r}); the classes are {list(prompt_task.classes)}"
                )
            pooled = classification_metrics(
                targets[mask],
                probabilities[mask],
                prompt_task.classes,
                positive=prompt_task.positive_index,
                n_boot=n_boot,
                seed=seed,
            )
            result = {
                "level": level,
                "task": prompt_task.name,
                "labels": str(labels),
                "label_column": raw_labels[1],
                "headline": headline,
                **label_report,
            }
            if n_sets:  # MI-Zero: each set is a classifier; the headline is their median, as MI-Zero reports
                sets = _prompt_set_summary(per_set(), targets, prompt_task)
                result.update(
                    {key: pooled[key] for key in ("n", "support", "classes_without_cases", "positive")},
                    metrics=_median_metrics(sets, pooled["metrics"]),
                    prompt_sets=sets,
                    pooled_ensemble=pooled,
                )
            else:
                result.update(pooled)
            files["metrics.json"] = (json.dumps(result, indent=2) + "\n").encode()
            files["roc.png"] = roc_png(
                targets[mask],
                probabilities[mask],
                prompt_task.classes,
                prompt_task.positive_index,
                title=title,
            )
            files["confusion.png"] = confusion_png(
                np.array(pooled["confusion_matrix"]["counts"]), prompt_task.classes, title=title
            )
        run = {
            "vlm_version": __version__,
            "model": model_source,
            "slides": "<in memory>" if isinstance(slides, SlideEmbeddings) else str(slides),
            "task": prompt_task.source,
            "task_name": prompt_task.name,
            "classes": list(prompt_task.classes),
            "positive": prompt_task.positive,
            "labels": None if labels is None else str(labels),
            "label_column": None if raw_labels is None else raw_labels[1],
            "prompt_sets": n_sets or 1,
            "headline": headline,
            "predictions": "pooled ensemble of all prompt sets" if n_sets else "prompt ensemble",
            "device": str(resolved),
            "level": level,
            "n_slides": len(scored_slides),
            **({"n_cases": len(slide_ids)} if slide_cases is not None else {}),
            "n_boot": n_boot,
            "seed": seed,
            "logit_scale": float(model.scale().detach()),
            "text_fingerprint": classifier.text_fingerprint,
            "cache": str(cache_dir or default_cache_dir()) if use_cache else None,
        }
        files["predictions.csv"] = predictions.to_csv(index=False, float_format="%.6g").encode()
        files["prompts_used.json"] = (json.dumps(classifier.prompts_used(), indent=2) + "\n").encode()
        files["run.json"] = (json.dumps(run, indent=2) + "\n").encode()
        for name, content in files.items():
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(content)
        for stale in set(LABEL_OUTPUTS) - set(files):
            if (out / stale).exists():
                (out / stale).unlink()
                log.info("removed %s from an earlier run (this run has no labels)", out / stale)
        log.info("zeroshot: %d slides, %d classes -> %s", len(scored_slides), len(prompt_task.classes), out)
        return result or run

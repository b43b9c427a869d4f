"""Case-level predictions from slide-level scores (`vlm zeroshot --level case`, `vlm probe --level case`).

A label such as a subtype or a mutation is often given per case (patient), while a case has several slides.
At `--level case` each slide is scored as usual, the slides of a case are combined by the **mean of their
logits** (for zero-shot, `softmax(mean logits)`: the case's probability; equal to a softmax of the mean
log-probability, so no slide's certainty dominates as a product of probabilities would), and metrics are
computed over cases, one per case. A slide's case is the `patient_id` of its row in the labels table.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from vlm.errors import InputError
from vlm.formats.tables import read_table

log = logging.getLogger(__name__)

LEVELS = ("slide", "case")
CASE_COLUMN = "patient_id"


def read_slide_cases(path: str | os.PathLike[str]) -> pd.Series:
    """slide_id -> patient_id from a labels table; refused without a `patient_id` column or with empty cells."""
    frame = read_table(path, required=("slide_id",), what="labels", all_text=True)
    if CASE_COLUMN not in frame.columns:
        raise InputError(
            f"{path}: `level` case needs a {CASE_COLUMN!r} column naming each slide's case (columns: "
            f"{list(frame.columns)})"
        )
    cases = frame.set_index("slide_id")[CASE_COLUMN].str.strip()
    empty = cases.index[cases == ""].tolist()
    if empty:
        raise InputError(f"{path}: empty {CASE_COLUMN!r} for {len(empty)} slide(s), e.g. {empty[:5]}; fill them")
    return cases


def case_labels(slide_labels: pd.Series, slide_cases: pd.Series, path: object) -> pd.Series:
    """patient_id -> label: the one label of each case's labelled slides; cases whose slides disagree are
    refused (a per-slide label cannot be scored per case)."""
    frame = pd.DataFrame({"case": slide_cases, "label": slide_labels.reindex(slide_cases.index)})
    frame = frame[frame["label"].notna() & (frame["label"] != "")]
    distinct = frame.groupby("case")["label"].unique()
    mixed = {case: sorted(values) for case, values in distinct.items() if len(values) > 1}
    if mixed:
        shown = "; ".join(f"{case}: {values}" for case, values in list(mixed.items())[:5])
        raise InputError(
            f"{path}: {len(mixed)} case(s) have slides with different labels ({shown}); `level` case needs one "
            "label per case (use `level` slide for per-slide labels)"
        )
    labels = distinct.map(lambda values: values[0])
    return pd.Series(labels.to_numpy(), index=labels.index.astype(str), dtype=object)


def mean_by_case(
    slide_ids: Sequence[str], slide_cases: pd.Series, scores: np.ndarray
) -> tuple[list[str], list[list[str]], np.ndarray]:
    """Cases (in order of first slide), each case's slide ids, and the mean of its slides' `scores` [N, C].

    Scored slides with no row in `slide_cases` have no case: they are left out, with a warning naming them.
    """
    rows: dict[str, list[int]] = {}
    orphans = []
    for row, slide_id in enumerate(slide_ids):
        case = slide_cases.get(slide_id)
        if case is None:
            orphans.append(slide_id)
        else:
            rows.setdefault(str(case), []).append(row)
    if orphans:
        log.warning("%d scored slide(s) are not in the labels table, so have no case, and are left out (e.g. %s)",
                    len(orphans), orphans[:5])
    if not rows:
        raise InputError("none of the scored slides is in the labels table: no case to predict")
    cases = list(rows)
    members = [[slide_ids[i] for i in rows[c]] for c in cases]
    means = np.stack([scores[rows[c]].mean(axis=0) for c in cases])
    return cases, members, means


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)

"""FAISS retrieval over the joint space: slides by report text, slide → slide, slide → report.

`SlideIndex` / `ReportIndex` are the notebook API; `build_slide_index`, `build_report_index`, `add_slides`
and `load_index` are what the `vlm index` / `vlm search` commands call; `evaluate_retrieval` is `vlm eval
retrieval`.
"""

from vlm.retrieval.index import SlideIndex, project_slides
from vlm.retrieval.kinds import KINDS, choose_kind
from vlm.retrieval.reports import (
    ReportIndex,
    add_slides,
    build_report_index,
    build_slide_index,
    load_index,
    read_metadata,
)

__all__ = [
    "KINDS",
    "ReportIndex",
    "SlideIndex",
    "add_slides",
    "build_report_index",
    "build_slide_index",
    "choose_kind",
    "load_index",
    "project_slides",
    "read_metadata",
]

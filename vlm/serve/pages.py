"""What each page of `vlm serve` shows, computed from a `ServeState` without HTTP: a search page, the JSON
search results, a slide page. Each returns a plain result object (the routes only render it), so a notebook
gets the viewer's numbers by calling these, and the rules on queries and pages live in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vlm.errors import InputError, UsageError
from vlm.serve.state import FileGone, ServeState

PER_PAGE = 10
MAX_QUERY_CHARS = 500
MAX_PAGE = 100
MAX_K = 1000
SIMILAR = 5


def check_query(q: str) -> str:
    """The search text, stripped; empty or overlong text is a `ValueError` the page shows as its message."""
    q = q.strip()
    if not q:
        raise InputError("the search text is empty: type a phrase, e.g. a line of a report")
    if len(q) > MAX_QUERY_CHARS:
        raise UsageError(f"the search text is {len(q)} characters long; keep it under {MAX_QUERY_CHARS}")
    return q


def _records(table: Any) -> list[dict[str, Any]]:
    """Search results as JSON-ready dicts, exactly as `vlm search --json` prints them."""
    from vlm.retrieval.index import result_records

    return result_records(table)


def _search(state: ServeState, q: str | None, similar: str | None, k: int) -> tuple[Any, str]:
    """The top `k` slides for a text `q`, or like the slide `similar`; and the page's title."""
    if similar:
        return state.index.search_slide(state.known(similar), k=k), f"slides like {similar}"
    return state.index.search_text(check_query(q or ""), k=k), q or ""


def search_results(state: ServeState, q: str | None, slide_id: str | None, k: int) -> list[dict[str, Any]]:
    """The JSON API's answer: records as `vlm search --json` prints them; bad `q` / `k` is a `ValueError`."""
    if (q is None) == (slide_id is None):
        raise InputError("give either q (a text) or slide_id")
    if not 1 <= k <= MAX_K:
        raise UsageError(f"k must be within 1–{MAX_K}, got {k}")
    return _records(_search(state, q, slide_id, k)[0])


@dataclass
class SearchPage:
    """One page of results, ranked on across pages (`offset` is the rank before the first result)."""

    q: str
    similar: str | None
    results: list[dict[str, Any]]
    title: str
    page_no: int
    more: bool
    offset: int


def search_page(state: ServeState, q: str | None, similar: str | None, page_no: int) -> SearchPage:
    """Page `page_no` of the slides matching text `q` or like slide `similar` (`ValueError` on a bad query or
    page, `NotHere` on an unknown slide)."""
    if not 1 <= page_no <= MAX_PAGE:
        raise UsageError(f"page {page_no} is out of range 1–{MAX_PAGE}")
    available = len(state.ids) - (1 if similar else 0)  # a slide is not listed as like itself
    table, title = _search(state, q, similar, max(min(available, page_no * PER_PAGE), 1))
    offset = (page_no - 1) * PER_PAGE
    return SearchPage(q=q or "", similar=similar, results=_records(table)[offset:], title=title, page_no=page_no,
                      more=page_no * PER_PAGE < available, offset=offset)


@dataclass
class SlidePage:
    """A slide's page: its metadata, the query's slide score, zero-shot probabilities, similar slides, and
    notes on what could not be computed (no features, a file gone) — the page still shows the rest."""

    slide_id: str
    q: str
    meta: dict[str, Any]
    similar: list[dict[str, Any]]
    heat_score: float | None = None
    probabilities: list[tuple[str, float]] | None = None
    task: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def message(self) -> str | None:
        return "; ".join(self.notes) or None


def _metadata(state: ServeState, slide_id: str) -> dict[str, Any]:
    """The slide's metadata row without its empty (NaN) cells."""
    frame = state.index.metadata
    row = frame[frame[state.index.key] == slide_id].iloc[0]
    return {c: row[c] for c in state.meta_columns if not (isinstance(row[c], float) and math.isnan(row[c]))}


def slide_page(state: ServeState, slide_id: str, q: str | None = None) -> SlidePage:
    """Everything the slide page shows (`NotHere` if the slide has no file here)."""
    state.known(slide_id, state.slides)
    similar = _records(state.index.search_slide(slide_id, k=min(SIMILAR, max(len(state.ids) - 1, 1))))
    page = SlidePage(slide_id=slide_id, q=q or "", meta=_metadata(state, slide_id), similar=similar,
                     task=state.classifier.task.name if state.classifier is not None else None)
    if q:
        try:
            page.q = check_query(q)
            if slide_id not in state.features:
                page.notes.append("no tile features for this slide (start vlm serve with --features): no heatmap")
            else:
                page.heat_score = state.heat_png(slide_id, page.q)[1]
        except (ValueError, FileNotFoundError, FileGone) as error:
            page.notes.append(f"no heatmap: {error}")
    if state.classifier is not None and slide_id in state.features:
        try:
            page.probabilities = state.probabilities(slide_id)
        except (ValueError, FileNotFoundError, FileGone) as error:
            page.notes.append(f"no zero-shot probabilities: {error}")
    return page


__all__ = ["SearchPage", "SlidePage", "check_query", "search_page", "search_results", "slide_page"]

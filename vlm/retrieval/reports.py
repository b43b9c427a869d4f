"""`ReportIndex` (slide → report search) and the file-level builders behind `vlm index build / build-reports`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd

from vlm.errors import InputError
from vlm.formats.embeddings import SlideEmbeddings, load_slide_embeddings
from vlm.formats.pairs import Pairs, load_pairs
from vlm.formats.tables import read_table
from vlm.io import folder_lock, remove_if_unused
from vlm.retrieval.index import ModelArg, SlideIndex, check_index_folder, read_manifest, resolve_model

log = logging.getLogger(__name__)
IndexT = TypeVar("IndexT", bound=SlideIndex)


class ReportIndex(SlideIndex):
    """Report texts in the joint space, for slide → report search (and text → report).

    Each report is keyed `report_id` = `<slide_id>#<n>` (n-th report of that slide in the pairs table); the
    metadata keeps `slide_id` and the `report` text, so results show the report and the slide it describes.
    """

    content: ClassVar[str] = "reports"
    key: ClassVar[str] = "report_id"

    @classmethod
    def build_reports(cls, model: ModelArg, pairs: Pairs, **options: Any) -> ReportIndex:
        """Encode every report of `pairs` with the text tower and index it (options as `from_vectors`)."""
        model, folder = resolve_model(model)
        report_ids = _report_ids(pairs.slide_ids)
        metadata = pd.DataFrame({"report_id": report_ids, "slide_id": pairs.slide_ids, "report": pairs.reports})
        if pairs.patient_ids is not None:
            metadata["patient_id"] = pairs.patient_ids
        if pairs.splits is not None:
            metadata["split"] = pairs.splits
        vectors = model.encode_text(pairs.reports, device="cpu").numpy()
        return cls.from_vectors(vectors, report_ids, model, metadata, model_path=folder, **options)

    def add_reports(self, slide_ids: Sequence[str], reports: Sequence[str]) -> None:
        """Encode and add reports of the given slides (numbered after the slide's reports already here)."""
        taken = self.metadata["slide_id"].tolist()
        report_ids = _report_ids([*taken, *slide_ids])[len(taken) :]
        metadata = pd.DataFrame({"report_id": report_ids, "slide_id": list(slide_ids), "report": list(reports)})
        self.add_vectors(self.model.encode_text(list(reports), device="cpu").numpy(), report_ids, metadata)

    def search_slide(  # type: ignore[override]
        self, slide_ids: str | Sequence[str], slides: SlideEmbeddings, k: int = 10
    ) -> pd.DataFrame:
        """Reports nearest to slides, given their unprojected embeddings (`vlm embed-slides` output)."""
        slide_ids = [slide_ids] if isinstance(slide_ids, str) else list(slide_ids)
        missing = [s for s in slide_ids if s not in slides.row]
        if missing:
            raise InputError(f"slide id(s) {missing[:10]} have no embedding in the slide-embeddings file given")
        slides.check_finite(slide_ids)
        return self.search_embeddings(slides.lookup(slide_ids), k)

    def search_report(self, report_ids: str | Sequence[str], k: int = 10, include_self: bool = False) -> pd.DataFrame:
        """Reports nearest to indexed reports (report → report)."""
        return self._search_items(report_ids, k, include_self)


def _report_ids(slide_ids: Sequence[str]) -> list[str]:
    counts: dict[str, int] = {}
    out = []
    for slide_id in slide_ids:
        counts[slide_id] = counts.get(slide_id, 0) + 1
        out.append(f"{slide_id}#{counts[slide_id]}")
    return out


def read_metadata(path: str | os.PathLike[str] | None) -> pd.DataFrame | None:
    """A user metadata table with a `slide_id` column (`vlm.formats.tables`), or None without a path."""
    return None if path is None else read_table(path, required=("slide_id",), what="metadata")


def build_slide_index(
    model: ModelArg,
    slides: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    metadata: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> SlideIndex:
    """`vlm index build`: index every slide of a `vlm embed-slides` parquet, saved to `out` when given.

    `out` must be new or empty, or an index to replace with `overwrite` (see `check_index_folder`).
    """

    def build() -> SlideIndex:
        embeddings = load_slide_embeddings(slides)
        source = {"slides": str(Path(slides).resolve()), "encoder": embeddings.encoder, "pool": embeddings.pool}
        embeddings.check_finite()
        return SlideIndex.build(model, embeddings.embeddings, embeddings.ids, read_metadata(metadata),
                                source=source, **options)

    return _build_into(out, overwrite, build)


def _build_into(out: str | os.PathLike[str] | None, overwrite: bool, build: Callable[[], IndexT]) -> IndexT:
    """Build, and save to `out` under its lock, refusing before any work a folder that must not be replaced."""
    if out is None:
        return build()
    check_index_folder(out, overwrite)
    created = not Path(out).exists()
    try:
        with folder_lock(out, create=True):
            check_index_folder(out, overwrite)  # again: another process may have written it meanwhile
            index = build()
            index.save(out)
    except BaseException:
        if created:
            remove_if_unused(Path(out).absolute())  # a failed build leaves no empty folder behind
        raise
    return index


def add_slides(
    index: SlideIndex, slides: str | os.PathLike[str], metadata: str | os.PathLike[str] | None = None
) -> list[str]:
    """`vlm index add`: add every slide of a `vlm embed-slides` parquet; returns the added slide ids.

    Every slide in the file must be new (re-adding one is an error naming it), so an accidental re-run
    neither skips nor duplicates anything silently.
    """
    embeddings = load_slide_embeddings(slides)
    source = index.manifest.get("source", {})
    for column in ("encoder", "pool"):
        if source.get(column, "unknown") not in ("unknown", getattr(embeddings, column)):
            raise InputError(
                f"{slides}: slide embeddings made with {column}={getattr(embeddings, column)!r}, but the index "
                f"holds {column}={source[column]!r}; embed the new slides the same way"
            )
    embeddings.check_finite()
    index.add(embeddings.embeddings, embeddings.ids, read_metadata(metadata))
    return embeddings.ids


def build_report_index(
    model: ModelArg,
    pairs: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> ReportIndex:
    """`vlm index build-reports`: index every report of a pairs table, saved to `out` when given."""
    return _build_into(out, overwrite, lambda: ReportIndex.build_reports(
        model, load_pairs(pairs), source={"pairs": str(Path(pairs).resolve())}, **options))


def load_index(path: str | os.PathLike[str], model: ModelArg | None = None, gpu: bool = False) -> SlideIndex:
    """A slide or report index folder, whichever it holds."""
    cls = ReportIndex if read_manifest(Path(path)).get("content") == "reports" else SlideIndex
    return cls.load(path, model=model, gpu=gpu)

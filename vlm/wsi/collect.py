"""Turn the SLIDES… arguments of a command into a list of slide files.

Each argument is a slide file, a folder (searched recursively for slide extensions), or a text file
(`.txt`/`.lst`) listing one path per line (blank lines and `#` comments ignored; relative paths are
relative to the list file). Duplicates are dropped, order is kept.

A DICOM slide is usually stored as several `.dcm` files (one per pyramid level, plus label and overview
images), and OpenSlide opens the whole series from any of them: the files of one series (same folder,
same `SeriesInstanceUID`) are one slide, listed once by its first file in sorted order (whose name is
then the slide id).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from vlm.errors import MissingInputError

# Extensions OpenSlide reads (https://openslide.org/formats/), lower-case.
SLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi"}
)
LIST_EXTENSIONS = frozenset({".txt", ".lst"})


def _from_list_file(path: Path) -> list[Path]:
    from vlm.formats.tables import read_list

    entries = [Path(line) for line in read_list(path, what="slide list")]
    return [entry if entry.is_absolute() else path.parent / entry for entry in entries]


def _dicom_series(path: Path) -> str | None:
    """The SeriesInstanceUID OpenSlide reports for a DICOM file, or None if it cannot open it."""
    import openslide

    try:
        with openslide.OpenSlide(str(path)) as slide:
            return slide.properties.get("dicom.SeriesInstanceUID")
    except (openslide.OpenSlideError, OSError):
        return None  # reported with its reason when the slide is opened


def group_dicom_series(paths: list[Path]) -> list[Path]:
    """`paths` with each DICOM series reduced to one entry (its first file in sorted order), order kept."""
    groups: dict[object, list[Path]] = {}
    for path in paths:
        series = _dicom_series(path) if path.suffix.lower() == ".dcm" else None
        key = (path.parent.resolve(), series) if series else path
        groups.setdefault(key, []).append(path)
    return [min(members) for members in groups.values()]


def collect_slides(arguments: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files, folders and list files into slide paths; raise if an argument yields nothing."""
    slides: dict[Path, None] = {}
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
            if not found:
                raise MissingInputError(
                    f"{path}: folder holds no slide files (looked for {', '.join(sorted(SLIDE_EXTENSIONS))})"
                )
            slides.update(dict.fromkeys(found))
        elif path.suffix.lower() in LIST_EXTENSIONS and path.is_file():
            listed = _from_list_file(path)
            if not listed:
                raise MissingInputError(f"{path}: slide list is empty")
            slides.update(dict.fromkeys(listed))
        elif path.exists():
            slides[path] = None
        else:
            raise MissingInputError(f"{path}: no such slide, folder or list file")
    if not slides:
        raise MissingInputError("no slides given")
    return group_dicom_series(list(slides))

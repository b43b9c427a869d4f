"""Turn the SLIDES… arguments of a command into a list of slide files.

Each argument is a slide file, a folder (searched recursively for slide extensions), or a text file
(`.txt`/`.lst`) listing one path per line (blank lines and `#` comments ignored; relative paths are
relative to the list file). Duplicates are dropped, order is kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# Extensions OpenSlide reads (https://openslide.org/formats/), lower-case.
SLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi"}
)
LIST_EXTENSIONS = frozenset({".txt", ".lst"})


def _from_list_file(path: Path) -> list[Path]:
    entries = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entry = Path(line)
            entries.append(entry if entry.is_absolute() else path.parent / entry)
    return entries


def collect_slides(arguments: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files, folders and list files into slide paths; raise if an argument yields nothing."""
    slides: dict[Path, None] = {}
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(
                    f"{path}: folder holds no slide files (looked for {', '.join(sorted(SLIDE_EXTENSIONS))})"
                )
            slides.update(dict.fromkeys(found))
        elif path.suffix.lower() in LIST_EXTENSIONS and path.is_file():
            listed = _from_list_file(path)
            if not listed:
                raise FileNotFoundError(f"{path}: slide list is empty")
            slides.update(dict.fromkeys(listed))
        elif path.exists():
            slides[path] = None
        else:
            raise FileNotFoundError(f"{path}: no such slide, folder or list file")
    if not slides:
        raise FileNotFoundError("no slides given")
    return list(slides)

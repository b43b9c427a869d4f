"""Data the package ships: the prompt tasks and the demo's real H&E slide.

`vlm/_data/prompts` links to the top-level `prompts/` folder, its single source; building the wheel copies the
files behind the link, so a task is found by name (`--task nsclc_subtyping`) in a source checkout and in an
installed package alike. The slide is OpenSlide's CMU-1-Small-Region test slide (CC0, see
`vlm/_data/ATTRIBUTION.md`).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from vlm.errors import MissingInputError

DATA_DIR = Path(__file__).resolve().parent / "_data"
PROMPTS_DIR = DATA_DIR / "prompts"
REAL_SLIDE = DATA_DIR / "cmu_small_region.svs"
TASK_SUFFIXES = (".yaml", ".yml", ".json")


def shipped_tasks() -> dict[str, Path]:
    """Task name (file stem) -> prompt file, for every task shipped with vlm."""
    if not PROMPTS_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(PROMPTS_DIR.iterdir()) if p.suffix.lower() in TASK_SUFFIXES}


def resolve_task(task: str | os.PathLike[str]) -> Path:
    """A prompt file path as given when it exists, else the shipped task of that name.

    A missing file is refused with the shipped names closest to what was asked, so a typo in a name does not
    read as a missing file.
    """
    path = Path(task)
    if path.exists():
        return path
    tasks = shipped_tasks()
    name = path.stem if path.suffix.lower() in TASK_SUFFIXES and path.parent == Path(".") else str(task)
    if name in tasks:
        return tasks[name]
    close = difflib.get_close_matches(name, list(tasks), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; shipped tasks: {', '.join(tasks) or 'none'}"
    raise MissingInputError(f"{task}: no such prompt file and no shipped task of that name{hint}")

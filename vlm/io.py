"""Small file helpers shared by every stage: atomic writes and slide ids.

Every output of `vlm` is written to a temporary name in the destination folder and renamed into place
only when complete, so an interrupted run never leaves a file that looks finished (resume relies on it).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path


def _current_umask() -> int:
    """The process umask (read by setting and restoring it: Python has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path, directory: bool = False) -> None:
    """Give a temporary file (0600) or folder (0700) the mode a plain `open`/`mkdir` would have.

    `mkstemp`/`mkdtemp` create private modes; without this, outputs renamed into place stay unreadable
    to colleagues on a shared server whatever their umask says.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_current_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    The temporary file lives in the same folder so that the final `os.replace` is atomic on POSIX.
    On any exception the temporary file is removed and the exception propagates.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            _follow_umask(tmp, directory=tmp.is_dir())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; swap it into place only if the block succeeds.

    For outputs that are folders (a model, an index): an existing folder is replaced only once the new one
    is complete, so a crash leaves either the old or the new folder, never a mix.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
    try:
        yield tmp
        _follow_umask(tmp, directory=True)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def slide_id_from_path(path: str | os.PathLike[str]) -> str:
    """The slide id is the file name without its extension (`TCGA-XX.svs` -> `TCGA-XX`)."""
    name = Path(path).name
    for multi in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(multi):
            return name[: -len(multi)]
    return Path(name).stem


def duplicate_ids(ids: Iterable[str]) -> list[str]:
    """The ids that occur more than once, sorted (every input that keys outputs by id must refuse these)."""
    return sorted(i for i, n in collections.Counter(ids).items() if n > 1)

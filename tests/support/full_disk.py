"""A real, small, full file system for tests of what `vlm` says when the disk fills up (no mocked errno)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def full_disk(where: Path, room: int = 0, size: str = "4m") -> Iterator[Path]:
    """Mount a `size` tmpfs at `where`, fill it with a ballast file until only about `room` bytes are left.

    Needs the right to mount (root, outside a restricted container); the test is skipped otherwise.
    """
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        ballast = where / "ballast"
        with open(ballast, "wb", buffering=0) as handle:
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * 4096)
        os.truncate(ballast, max(0, ballast.stat().st_size - room))
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)

"""A newcomer's path: output file modes, `--help`, offline encoders from the command line."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vlm.io import atomic_dir, atomic_path


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_outputs_follow_the_umask(tmp_path: Path, umask_022: None) -> None:
    """Temporary files of atomic writes are 0600 / 0700; what is renamed into place must follow the umask."""
    with atomic_path(tmp_path / "summary.md") as tmp:
        tmp.write_text("hi")
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
    assert _mode(tmp_path / "summary.md") == 0o644
    assert _mode(tmp_path / "model") == 0o755
    assert _mode(tmp_path / "model" / "model.safetensors") == 0o644


def test_tile_command_outputs_follow_the_umask(tmp_path: Path, umask_022: None, real_slide: Path) -> None:
    """A real command's outputs (tile grid HDF5 files, QC thumbnails) are readable by the group and others."""
    from vlm.cli import main

    assert main(["tile", str(real_slide), "--out", str(tmp_path / "tiles"), "--no-progress"]) == 0
    written = [p for p in (tmp_path / "tiles").rglob("*") if p.is_file()]
    assert written
    assert {p.name: _mode(p) for p in written} == {p.name: 0o644 for p in written}

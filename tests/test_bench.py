"""The bench scripts' own plumbing (their figures come from running them, never from tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_reader_table_names_every_mode_apart_even_with_one_worker() -> None:
    """With --workers 1, the calling thread and a one-thread pool were both labelled "1 thread": two rows of
    the table (and two JSON cases) with the same name and different figures."""
    code = (
        "import readers; "
        "print('|'.join(readers._label(m, w) for w in (1, 4) for m in ('main', 'processes', 'threads')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True, text=True, check=True)
    labels = out.stdout.strip().split("|")
    assert labels == ["main thread", "1 process", "1 pool thread", "main thread", "4 processes", "4 pool threads"]


def test_reader_workers_start_without_torch() -> None:
    """readers.py's `processes` workers are spawned and import the module again: torch at module level (through
    bench/tiling.py or vlm.wsi.tiling) made each worker start in seconds."""
    code = "import sys, readers; print(sorted({'torch', 'skimage'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_gpu_script_refuses_an_unknown_argument_before_doing_anything() -> None:
    """A mistyped `--smoke` must not start the full GPU run (nor install wheels)."""
    env = {**os.environ, "PYTHON": "false"}  # any Python call would fail with another message
    result = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--smok"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and result.stderr.strip() == "usage: bench/gpu.sh [--smoke]"

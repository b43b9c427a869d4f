"""`pip install .` (a wheel, not editable) gives a working `vlm` outside the checkout, with its shipped data.

The wheel goes into a fresh virtual environment that sees the already installed dependencies through a `.pth`
line (nothing is downloaded; the editable `vlm` of the development environment is not visible there), and
`vlm zeroshot --task nsclc_subtyping` runs from a folder outside the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.support.models import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCE = (
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "demo_out",
    "site",
    "runs",
    ".ipynb_checkpoints",
)


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of the checkout, so the build leaves nothing (build/, *.egg-info) in it."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = (tmp_path / "dist").glob("vlm-*.whl")
    return wheel


def _fresh_env(tmp_path: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed and the shared dependencies reachable; returns its bin folder."""
    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    return env / "bin"


@pytest.mark.slow
def test_installed_wheel_runs_a_shipped_task_by_name_outside_the_checkout(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "vlm/_data/prompts/nsclc_subtyping.yaml" in names and "vlm/_data/cmu_small_region.svs" in names
    assert not [n for n in names if n.startswith("tests/")]
    assert "vlm/_data/report_cleaning.yaml" in names  # vlm pairs' default cleaning rules
    shipped = {Path(n).stem for n in names if n.startswith("vlm/_data/prompts/") and n.endswith(".yaml")}
    assert shipped == {p.stem for p in (ROOT / "prompts").glob("*.yaml")}

    bin_dir = _fresh_env(tmp_path, wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()
    build_tiny_model(work / "build").save_pretrained(work / "model")
    rng = np.random.default_rng(0)
    slides = pd.DataFrame({"slide_id": [f"s{i}" for i in range(6)], "n_tiles": 5, "encoder": "tiny", "pool": "mean"})
    slides["embedding"] = [rng.standard_normal(64).astype(np.float32).tolist() for _ in range(6)]
    slides.to_parquet(work / "slides.parquet")
    pd.DataFrame({"slide_id": slides["slide_id"], "label": ["LUAD", "LUSC"] * 3}).to_csv(
        work / "labels.csv", index=False
    )

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [bin_dir / "python", "-c", "import vlm.demo.run as d, vlm.resources as r; "
         "print(r.__file__, d.PROMPT_FILE.is_file(), r.REAL_SLIDE.is_file())"],
        cwd=work, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(tmp_path / "env") and where[1:] == ["True", "True"]

    run = subprocess.run(
        [bin_dir / "vlm", "zeroshot", "--model", "model", "--embeddings", "slides.parquet", "--task", "nsclc_subtyping",
         "--labels", "labels.csv", "--out", "zs", "--n-boot", "20", "--cache-dir", "cache", "--no-progress"],
        cwd=work, env=env, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    task = json.loads((work / "zs" / "run.json").read_text())["task"]
    assert Path(task).is_relative_to(tmp_path / "env") and Path(task).name == "nsclc_subtyping.yaml"
    assert list(pd.read_csv(work / "zs" / "predictions.csv").columns[1:3]) == ["LUAD", "LUSC"]

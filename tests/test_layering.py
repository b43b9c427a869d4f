"""The layout is the data flow: a stage module (the one a command calls) uses the building blocks (`wsi`,
`encoders`, `formats`, `model`, `retrieval`, …) and never another stage, so each stage can be read, tested and
moved on its own. Only the command line (`vlm.commands`, `vlm.cli`) and the demo chain stages together."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import vlm

PACKAGE = Path(vlm.__file__).parent
STAGES = ("vlm.tile", "vlm.tile_features", "vlm.slide_embeddings", "vlm.training", "vlm.zeroshot", "vlm.probe",
          "vlm.heatmap", "vlm.serve", "vlm.cohort", "vlm.labels")
CHAINS_STAGES = ("vlm.commands", "vlm.cli", "vlm.demo")


def _stage_of(module: str) -> str | None:
    return next((stage for stage in STAGES if module == stage or module.startswith(stage + ".")), None)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_imports() -> list[str]:
    """Every `stage -> other stage` import in the package, lazy imports inside functions included."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        own = _stage_of(module)
        if own is None or module.startswith(CHAINS_STAGES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            found += [f"{module} -> {name}" for name in names if _stage_of(name) not in (None, own)]
    return found


def test_no_stage_module_imports_another_stage() -> None:
    assert stage_imports() == []


def test_the_check_sees_a_lazy_stage_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check reads imports inside functions too (the way stages used to reach each other)."""
    fake = tmp_path / "vlm"
    (fake / "zeroshot").mkdir(parents=True)
    (fake / "zeroshot" / "__init__.py").write_text("def f():\n    from vlm.heatmap import run_heatmaps\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert stage_imports() == ["vlm.zeroshot -> vlm.heatmap"]

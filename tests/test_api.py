"""The flat public API (`from vlm import …`), shipped data, and the rule that the library never reads tests/."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vlm
from vlm.prompts import load_prompt_task
from vlm.resources import REAL_SLIDE, resolve_task, shipped_tasks

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "faiss", "transformers", "timm", "open_clip")


def test_import_vlm_loads_no_heavy_library() -> None:
    """`import vlm` and `vlm --help` stay light: the exports are resolved on first use, not at import."""
    code = (
        "import sys, contextlib, io, vlm, vlm.cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    vlm.cli.main(['--help'])\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]"


def test_every_export_resolves_to_what_its_module_defines() -> None:
    import importlib

    assert set(vlm.__all__) == {"__version__", *vlm._EXPORTS}
    assert set(vlm._EXPORTS) <= set(dir(vlm))
    for name, target in vlm._EXPORTS.items():
        module, attribute = target.split(":")
        assert getattr(vlm, name) is getattr(importlib.import_module(module), attribute), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = vlm.nope


def test_no_export_is_also_a_module_name() -> None:
    """An exported name that is also a submodule `vlm.<name>` flips between module and function depending on
    what was imported first; the names must not collide, so both stay what they are."""
    import pkgutil

    modules = {info.name for info in pkgutil.iter_modules(vlm.__path__)}
    assert not modules & set(vlm._EXPORTS)
    import vlm.training as training_package
    from vlm.training import loop

    assert vlm.train is loop.train
    assert training_package.loop is loop  # the package, not the function


def _imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_notebooks_use_only_the_flat_api() -> None:
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for notebook in notebooks:
        cells = json.loads(notebook.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        deep = sorted(m for m in _imports(code) if m.startswith("vlm.") and m != "vlm.demo")
        assert deep == [], f"{notebook.name} imports {deep}; use `from vlm import …` (or `vlm.demo` for the demo)"
        assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), f"{notebook.name}: outputs"


def test_readme_python_snippets_use_only_the_flat_api() -> None:
    """The README's and the docs pages' snippets import only `from vlm import …`."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in page.read_text().split("```python")[1:]:
            code = textwrap.dedent(block.split("```")[0])
            deep = sorted(m for m in _imports(code) if m.startswith("vlm."))
            assert deep == [], f"{page.relative_to(ROOT)}: snippet imports {deep}"


def test_shipped_tasks_are_the_prompts_folder_and_load_by_name() -> None:
    assert set(shipped_tasks()) == {p.stem for p in (ROOT / "prompts").glob("*.yaml")}
    task = load_prompt_task("nsclc_subtyping")
    assert task.classes == load_prompt_task(ROOT / "prompts" / "nsclc_subtyping.yaml").classes
    assert resolve_task("nsclc_subtyping.yaml") == shipped_tasks()["nsclc_subtyping"]


def test_an_existing_file_wins_over_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("nsclc_subtyping.yaml").write_text("type: classification\n")
    assert resolve_task("nsclc_subtyping.yaml") == Path("nsclc_subtyping.yaml")


def test_a_misspelt_task_name_is_refused_with_close_names() -> None:
    with pytest.raises(FileNotFoundError, match=r"nsclc_subtypng.*did you mean nsclc_subtyping"):
        load_prompt_task("nsclc_subtypng")


def test_the_library_never_reads_tests() -> None:
    """No module of the package names the tests folder; the demo's slide is package data."""
    assert REAL_SLIDE.is_file() and not REAL_SLIDE.is_symlink()
    assert ROOT / "tests" not in REAL_SLIDE.resolve().parents
    for module in (ROOT / "vlm").rglob("*.py"):
        assert "tests" not in {
            part
            for node in ast.walk(ast.parse(module.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            for part in node.value.split("/")
        }, module


def test_no_reference_to_documents_that_do_not_exist() -> None:
    """Section marks of design/style documents the repository does not have point a reader nowhere."""
    documents = [name for name in ("DESIGN", "STYLE") if not (ROOT / f"{name}.md").exists()]
    files = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("prompts/*"), *ROOT.glob("notebooks/*.ipynb")]
    files += [p for folder in ("vlm", "tests", "bench") for p in (ROOT / folder).rglob("*.py")]
    for path in files:
        text = path.read_text()
        for name in documents:
            for mark in (f"{name} \u00a7", f"{name}.md"):
                assert mark not in text, f"{path.relative_to(ROOT)} refers to {mark!r}"


def test_prompts_check_without_paths_checks_every_shipped_task(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from vlm.cli import main

    assert main(["prompts", "check"]) == 0
    checked = {Path(line.split()[1]).stem for line in capsys.readouterr().out.splitlines() if line.startswith("ok")}
    assert checked == set(shipped_tasks())
    assert main(["prompts", "check", "rcc_subtyping"]) == 0
    assert main(["prompts", "check", "rcc_subtypin"]) == 2
    assert "did you mean rcc_subtyping" in caplog.text


def test_test_modules_import_neither_each_other_nor_conftest() -> None:
    """pytest imports test modules and conftest itself; shared helpers live in tests/support."""
    for path in (ROOT / "tests").rglob("*.py"):
        tree = ast.parse(path.read_text())
        relative = {f".{n.module or ''}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
        for module in _imports(path.read_text()) | relative:
            last = module.rsplit(".", 1)[-1]
            assert last != "conftest" and not last.startswith("test_"), f"{path.relative_to(ROOT)} imports {module}"

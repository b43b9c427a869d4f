"""The error family: what vlm raises on purpose is a `VlmError` (and still the built-in a user catches), and the
command line alone turns parameter names into the flags the user typed."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest

import vlm
from vlm.cli import build_parser
from vlm.errors import InputError, MissingInputError, RunError, UsageError, VlmError, with_flag_names

PACKAGE = Path(vlm.__file__).parent


def test_each_kind_is_a_vlm_error_and_the_builtin_a_user_catches() -> None:
    assert vlm.VlmError is VlmError
    for kind, builtin, code in [(InputError, ValueError, 2), (UsageError, ValueError, 2),
                                (MissingInputError, FileNotFoundError, 2), (RunError, RuntimeError, 1)]:
        with pytest.raises(builtin):
            raise kind("x")
        assert issubclass(kind, VlmError) and kind.exit_code == code
    assert str(MissingInputError("slides/a.svs: no such file")) == "slides/a.svs: no such file"


def test_parameter_names_become_the_flags_of_the_command_that_ran() -> None:
    args = build_parser().parse_args(["index", "build", "--slides", "s.parquet", "--model", "m", "--out", "o"])
    message = "`target_recall` must be in (0, 1]; `slides.parquet` has no `vector` column"
    shown = with_flag_names(message, args._flags)
    assert shown == "--target-recall must be in (0, 1]; `slides.parquet` has no `vector` column"
    # a parameter this command does not have stays as written
    assert with_flag_names("`n_boot` must be >= 1", args._flags) == "`n_boot` must be >= 1"


def test_the_command_line_shows_flags_and_keeps_a_bugs_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library error naming `n_boot` reads --n-boot at the command line (exit 2, one line); an error vlm did not
    raise on purpose is not dressed as a usage error: it keeps its traceback."""
    from vlm.cli import main

    table = tmp_path / "labels.csv"
    table.write_text("slide_id,label\na,x\n")
    argv = ["probe", "--slides", str(tmp_path / "none.parquet"), "--labels", str(table), "--test-labels", str(table),
            "--out", str(tmp_path / "out"), "--n-boot", "0"]
    assert main(argv) == 2
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == "--n-boot must be >= 1, got 0" and not record.exc_info

    import vlm.probe

    def bug(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug's message")

    monkeypatch.setattr(vlm.probe, "run_probe", bug)
    with pytest.raises(ValueError, match="a bug's message"):
        main([*argv[:-1], "10"])
    assert "a bug in vlm" in caplog.text


def test_library_modules_raise_the_family_and_name_no_flags() -> None:
    """No `raise ValueError(...)`/`FileNotFoundError(...)` in the library (those are `InputError`, `UsageError`,
    `MissingInputError`), and no message of the library names a command-line flag outside a written-out command:
    the CLI alone turns parameter names into flags."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in ("commands", "cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            name = getattr(node.exc.func, "id", "")
            if name in ("ValueError", "FileNotFoundError"):
                found.append(f"{path.name}:{node.lineno}: raise {name}")
            for text in _strings(node.exc):
                if re.search(r"(?<![\w`-])--[a-z]", re.sub(r"`[^`]*`", "", text)):
                    found.append(f"{path.name}:{node.lineno}: names a flag: {text!r}")
    assert found == []


def _strings(node: ast.AST) -> list[str]:
    """The literal text of a message, an f-string's placeholders as `{}` (its parts are not read again alone)."""
    joined = [child for child in ast.walk(node) if isinstance(child, ast.JoinedStr)]
    parts = {id(value) for string in joined for value in string.values}
    texts = ["".join(v.value if isinstance(v, ast.Constant) else "{}" for v in string.values) for string in joined]
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str) and id(child) not in parts:
            texts.append(child.value)
    return texts


def test_batch_failures_read_as_the_caller_typed() -> None:
    """A per-slide failure (logged, listed in failures.csv) names flags while a command runs, else parameters."""
    from vlm.errors import describe, shown_as_flags

    error = UsageError("the slide records no microns-per-pixel; pass it with `mpp`")
    assert describe(error).endswith("pass it with `mpp`")
    with shown_as_flags({"mpp": "--mpp"}):
        assert describe(error).endswith("pass it with --mpp")
    assert describe(error).endswith("pass it with `mpp`")

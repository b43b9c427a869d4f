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


def _parsers():
    """Every (sub)command parser of `vlm`, with its full name."""
    import argparse

    from vlm.cli import build_parser

    def walk(parser: argparse.ArgumentParser, name: str):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}")

    return list(walk(build_parser(), "vlm"))


def test_every_command_has_a_description_and_shows_its_defaults() -> None:
    import re

    for name, parser in _parsers():
        assert parser.description, f"`{name} --help` has no description"
        page = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                if action.dest in ("help", "version"):
                    continue
                flag = action.option_strings[0]
                entry = re.search(rf"^  {flag}\b.*?(?=^  -|\Z)", page, re.M | re.S)
                shown = entry is not None and "(default: " in " ".join(entry.group(0).split())
                assert shown, f"`{name} --help` hides the default of {flag}"
                assert not re.search(r"\(default[ )]", action.help or ""), f"{name} {flag}: default written twice"
    pages = dict(_parsers())
    assert "(default: 12)" in " ".join(pages["vlm demo"].format_help().split())
    assert "(default: 1 5 10)" in " ".join(pages["vlm eval retrieval"].format_help().split())


@pytest.mark.parametrize("flag", ["--precision", "--pool"])
def test_train_checks_precision_and_pool_choices(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    from vlm.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--pairs", "p.csv", "--out", "o", flag, "bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err

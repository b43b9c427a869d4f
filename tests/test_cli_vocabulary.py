"""One word per kind of input across every command: `--slides` = slide images, `--features` = tile-feature
files, `--embeddings` = the slide-embeddings parquet. Old spellings parse for one release, with one warning."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlm.cli import build_parser
from vlm.commands.options import DeprecatedSpelling

Parser = argparse.ArgumentParser
PARQUET_COMMANDS = ("train", "zeroshot", "probe", "index build", "index add", "search", "eval retrieval", "pairs")


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Parser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield " ".join((*path, name)), sub
                yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(build_parser()))


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def _visible(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for flag, action in _options(parser).items() if action.help != argparse.SUPPRESS}


def test_the_parquet_is_embeddings_in_every_command_that_reads_it() -> None:
    for name in PARQUET_COMMANDS:
        assert "--embeddings" in _visible(COMMANDS[name]), name
    for name, parser in COMMANDS.items():
        for flag, action in _visible(parser).items():
            text = (action.help or "").lower()
            if re.search(r"embeddings? parquet|parquet of .*embeddings", text):
                assert flag == "--embeddings", f"vlm {name} {flag}: the slide-embeddings parquet is --embeddings"


def test_slides_means_slide_images_only() -> None:
    seen = 0
    for name, parser in COMMANDS.items():
        action = _visible(parser).get("--slides")
        if action is None:
            continue
        seen += 1
        assert not re.search(r"parquet|embedding|feature|\.h5", action.help or "", re.I), f"vlm {name} --slides"
    assert seen >= 2  # vlm pairs, vlm serve


def test_old_spellings_are_only_hidden_deprecated_aliases() -> None:
    for name, parser in COMMANDS.items():
        options = _options(parser)
        if "--slide-embeddings" in options:
            assert isinstance(options["--slide-embeddings"], DeprecatedSpelling), name
        for flag, action in options.items():
            if isinstance(action, DeprecatedSpelling):
                assert flag not in _visible(parser), f"vlm {name} {flag} shows on the help page"
        page = parser.format_help()
        assert "--slide-embeddings" not in page, name


@pytest.mark.parametrize(
    ("argv", "dest", "new"),
    [
        (["train", "--slide-embeddings", "s.parquet"], "embeddings", "--embeddings"),
        (["probe", "--slides", "s.parquet", "--labels", "a", "--test-labels", "b", "--out", "o"], "embeddings",
         "--embeddings"),
        (["index", "build", "--model", "m", "--slides", "s.parquet", "--out", "o"], "embeddings", "--embeddings"),
        (["index", "add", "--index", "i", "--slides", "s.parquet"], "embeddings", "--embeddings"),
        (["search", "--index", "i", "--slide-id", "x", "--slides", "s.parquet"], "embeddings", "--embeddings"),
        (["eval", "retrieval", "--model", "m", "--pairs", "p", "--slides", "s.parquet"], "embeddings",
         "--embeddings"),
        (["zeroshot", "--model", "m", "--task", "t", "--out", "o", "--slides", "s.parquet"], "embeddings",
         "--embeddings"),
    ],
)
def test_deprecated_spellings_still_parse_and_warn_once(
    argv: list[str], dest: str, new: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == "s.parquet"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert len(warnings) == 1 and f"use {new} s.parquet" in warnings[0], warnings


def test_zeroshot_slides_maps_a_folder_to_features_and_a_file_to_embeddings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vlm zeroshot --slides` took a parquet or a features folder; each now goes to its own flag."""
    base = ["zeroshot", "--model", "m", "--task", "t", "--out", "o", "--slides"]
    folder = build_parser().parse_args([*base, str(tmp_path)])
    assert (folder.features, folder.embeddings) == (str(tmp_path), None)
    assert f"use --features {tmp_path}" in capsys.readouterr().err
    parquet = build_parser().parse_args([*base, "s.parquet"])
    assert (parquet.features, parquet.embeddings) == (None, "s.parquet")


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--slide-embeddings", "a.parquet", "--embeddings", "b.parquet"],
        ["probe", "--slides", "a.parquet", "--embeddings", "b.parquet", "--labels", "a", "--test-labels", "b",
         "--out", "o"],
        ["zeroshot", "--model", "m", "--task", "t", "--out", "o", "--slides", "a.parquet", "--features", "f"],
        ["zeroshot", "--model", "m", "--task", "t", "--out", "o"],  # neither input
        ["index", "build", "--model", "m", "--out", "o"],
    ],
)
def test_one_input_per_flag(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Old and new spelling together (or no input at all) is a usage error, not a silent pick of one."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.split("error:")[-1]
    assert "--embeddings" in error or "--features" in error, error  # it names a flag to use


def test_error_messages_name_the_new_flag() -> None:
    """`_record_flags` maps a parameter to the visible flag, never to the hidden old spelling."""
    args = build_parser().parse_args(["probe", "--slides", "s.parquet", "--labels", "a", "--test-labels", "b",
                                      "--out", "o"])
    assert args._flags["embeddings"] == "--embeddings"
    assert not any(flag in ("--slides", "--slide-embeddings") for flag in args._flags.values())

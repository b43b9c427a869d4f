"""The commands of the README and of the docs pages stay true: every `vlm …` line parses with the real CLI, and
those that can run offline on the repository's own files do run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from vlm.cli import build_parser, main

ROOT = Path(__file__).parents[1]


def documents() -> list[Path]:
    """The README and every page of the docs site."""
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    return [ROOT / "README.md", *pages]


def readme_commands() -> list[str]:
    """`vlm …` commands from the bash blocks of the README and the docs pages, continuation lines joined,
    comments dropped."""
    text = "\n".join(path.read_text() for path in documents())
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            line = re.sub(r"^torchrun .*? -m vlm ", "vlm ", line)
            if line.startswith("vlm "):
                commands.append(line)
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_every_stage() -> None:
    verbs = {shlex.split(c.replace("…", "x"))[1] for c in COMMANDS}
    assert {"info", "tile", "embed-tiles", "embed-slides", "train", "zeroshot", "prompts", "index", "search",
            "eval", "demo"} <= verbs


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command: str) -> None:
    # `[--pool mean|cls|all-layers]` marks optional flags with their choices: drop such groups
    argv = shlex.split(re.sub(r"\[[^\]]*\]", "", command).replace("…", "x"))[1:]
    build_parser().parse_args(argv)  # SystemExit (argparse error) fails the test


def test_offline_readme_commands_run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["prompts", "check", "prompts/"]) == 0
    assert "nsclc_subtyping" in capsys.readouterr().out
    assert main(["info", "tests/data/"]) == 0
    assert '"mpp": 0.499' in capsys.readouterr().out

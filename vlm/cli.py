"""The `vlm` command line: each subcommand parses its flags and calls one documented library function.

Each module in `vlm.commands` defines `register(subparsers)`, which adds its subcommands and sets
`func` on each to a handler `(args) -> int` returning the exit code. Heavy imports (torch, timm) happen
inside handlers so that `vlm --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from vlm import __version__
from vlm.commands import demo, retrieval, slides, tiles, train, view, zeroshot

log = logging.getLogger("vlm")

# Listed in pipeline order, which is the order `vlm --help` shows.
_COMMAND_MODULES = (tiles, slides, train, zeroshot, retrieval, view, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm", description="Align whole-slide images with pathology reports.")
    parser.add_argument("--version", action="version", version=f"vlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, ImportError, OSError) as error:
        # User-facing errors carry their fix in the message; a traceback would only hide it.
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())

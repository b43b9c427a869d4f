"""The `vlm` command line: each subcommand parses its flags and calls one documented library function.

Each module in `vlm.commands` defines `register(subparsers)`, which adds its subcommands and sets
`func` on each to a handler `(args) -> int` returning the exit code. Heavy imports (torch, timm) happen
inside handlers so that `vlm --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
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
        # User-facing errors carry their fix in the message; a traceback would only hide it (-v shows it).
        log.error("%s", error, exc_info=args.verbose)
        return 2
    except FloatingPointError as error:  # training diverged on these data: the run failed, not its usage
        log.error("%s", error, exc_info=args.verbose)
        return 1
    except Exception as error:
        if not _is_library_error(error):
            raise  # a bug of vlm: keep the whole traceback
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        log.error("%s: %s (a damaged or foreign input file; -v shows the traceback)", type(error).__name__, first,
                  exc_info=args.verbose)  # fmt: skip
        return 2


# Errors the file-reading libraries raise on damaged or foreign files, by class name so that this module
# imports none of them (`vlm --help` stays light).
_LIBRARY_ERRORS = frozenset({"SafetensorError", "UnpicklingError", "DatasetGenerationError", "HDF5ExtError"})


def _is_library_error(error: BaseException) -> bool:
    """True for a known library's error about its input file; FAISS raises a bare RuntimeError from its core."""
    if any(cls.__name__ in _LIBRARY_ERRORS for cls in type(error).__mro__):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return isinstance(error, RuntimeError) and bool(frames) and "/faiss/" in frames[-1].filename.replace("\\", "/")


if __name__ == "__main__":
    sys.exit(main())

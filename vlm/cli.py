"""The `vlm` command line: each subcommand parses its flags and calls one documented library function.

Each module in `vlm.commands` defines `register(subparsers)`, which adds its subcommands and sets
`func` on each to a handler `(args) -> int` returning the exit code. Heavy imports (torch, timm) happen
inside handlers so that `vlm --help` stays instant.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Sequence

from vlm import __version__
from vlm.commands import cohort, demo, probe, retrieval, slides, tiles, train, view, zeroshot
from vlm.commands.options import DeprecatedSpelling
from vlm.errors import VlmError, describe, shown_as_flags

log = logging.getLogger("vlm")

# Listed in pipeline order, which is the order `vlm --help` shows.
_COMMAND_MODULES = (cohort, tiles, slides, train, zeroshot, probe, retrieval, view, demo)


class HelpFormatter(argparse.HelpFormatter):
    """Every option with a real default shows it (`None` and flags do not); examples keep their line breaks."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():  # an epilog of examples, laid out by hand
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._shows_default(action):  # an option without help still shows its default
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default = action.default  # by identity: a default of 0 or 0.0 equals False, and must still show
        shown = default is not None and default is not False and default != argparse.SUPPRESS
        return shown and bool(action.option_strings)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = (action.help or "").strip()
        if self._shows_default(action) and "%(default)" not in text and not isinstance(action, argparse._VersionAction):
            text = f"{text} " if text else ""
            if isinstance(action.default, list | tuple):  # nargs="+" defaults read as typed: 1 5 10
                return text + "(default: " + " ".join(map(str, action.default)).replace("%", "%%") + ")"
            return f"{text}(default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """The parser of `vlm` and of every subcommand, so that all `--help` pages share `HelpFormatter`."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="vlm", description="Align whole-slide images with pathology reports.")
    parser.add_argument("--version", action="version", version=f"vlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)
    for module in _COMMAND_MODULES:
        module.register(subparsers)
    _describe(parser)
    _record_flags(parser)
    return parser


def _record_flags(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command records its parameter → flag names, so that an error naming a parameter of the library
    (`n_boot`) is shown with the flag the user typed (`--n-boot`)."""
    flags = {action.dest: max(action.option_strings, key=len) for action in parser._actions
             if action.option_strings and action.dest not in ("help", "version")
             and not isinstance(action, DeprecatedSpelling)}
    parser.set_defaults(_flags=flags)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _record_flags(sub)


def _describe(parser: argparse.ArgumentParser) -> None:
    """A (sub)command's page opens with its one-line help where no longer description was written."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    sub.description = helps[name][0].upper() + helps[name][1:] + "."
                _describe(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # FAISS logs at INFO which CPU-specific builds it could not load, on every import: noise, unless -v.
    logging.getLogger("faiss.loader").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    with shown_as_flags(args._flags):  # parameters read as flags in every message of this command
        try:
            return int(args.func(args))
        except VlmError as error:  # raised on purpose: the message says what is wrong and what to do
            log.error("%s", describe(error), exc_info=args.verbose)
            return error.exit_code
        except KeyboardInterrupt as error:  # Ctrl-C: one line (what was kept, how to go on), the shell's code 130
            log.error("%s", str(error) or "interrupted", exc_info=args.verbose)
            return 130
        except (OSError, ImportError) as error:
            # The system's answer about a file, a folder or an installed package (no permission, no space, a missing
            # extra): not a bug of vlm, and its message names what is wrong (-v shows the traceback).
            log.error("%s", describe(error), exc_info=args.verbose)
            return 2
        except Exception as error:
            if _is_library_error(error):
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                log.error("%s: %s (a damaged or foreign input file; -v shows the traceback)", type(error).__name__,
                          first, exc_info=args.verbose)
                return 2
            log.error("vlm stopped on an unexpected %s: a bug in vlm, or an input it does not check yet. Please report "
                      "it with the command and the traceback below.", type(error).__name__)
            raise


# Errors the file-reading libraries raise on damaged or foreign files, by class name so that this module
# imports none of them (`vlm --help` stays light): a net under the readers, which name the file themselves.
_LIBRARY_ERRORS = frozenset({"SafetensorError", "UnpicklingError", "DatasetGenerationError", "HDF5ExtError"})


def _is_library_error(error: BaseException) -> bool:
    """True for a known file-reading library's error about its input file."""
    return any(cls.__name__ in _LIBRARY_ERRORS for cls in type(error).__mro__)


if __name__ == "__main__":
    sys.exit(main())

"""vlm's errors: one family, so that a user's problem and a bug in vlm read differently.

Every error vlm raises on purpose is a `VlmError`, and each kind also derives from the built-in exception a
Python user would catch for it (`except ValueError` keeps working):

- `InputError` (`ValueError`): an input file, table or value that cannot be used; the message names the file
  and says what to do.
- `MissingInputError` (`FileNotFoundError`): an input path that does not exist.
- `UsageError` (`ValueError`): arguments out of range or that do not fit together. Messages name parameters
  as Python spells them, in backticks (`` `n_boot` must be >= 1``); the command line shows the flag instead
  (`--n-boot must be >= 1`), so a notebook user never reads a flag they did not type.
- `RunError` (`RuntimeError`): a well-formed run that failed: training diverged, weights could not be had,
  the disk filled up.

The command line (`vlm.cli.main`) catches `VlmError` alone: it prints the message on one line and exits 2
(input, usage) or 1 (a failed run). Any other exception keeps its traceback, as a bug should. While a command
runs, `describe` also shows flags for the per-slide failures a batch logs and lists in failures.csv.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping


class VlmError(Exception):
    """Base of the errors vlm raises on purpose; `exit_code` is what the command line exits with."""

    exit_code = 2


class InputError(VlmError, ValueError):
    """An input (file, table, value read from a file) that cannot be used; the message names it."""


class MissingInputError(VlmError, FileNotFoundError):
    """An input path that does not exist."""

    def __str__(self) -> str:  # FileNotFoundError(msg) would print "[Errno …]" forms only when given errno
        return str(self.args[0]) if self.args else ""


class UsageError(VlmError, ValueError):
    """Arguments out of range or that do not fit together; parameters are named in backticks."""


class RunError(VlmError, RuntimeError):
    """A well-formed run that failed (diverged, no weights, no disk space): not the user's typing."""

    exit_code = 1


class NonFiniteError(RunError, FloatingPointError):
    """A computation gave NaN or inf on these data: training diverged, or an encoder overflowed."""


_PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)`")


def with_flag_names(message: str, flags: Mapping[str, str]) -> str:
    """`message` with each backticked parameter that is a flag of the command shown as that flag.

    `flags` maps parameter names (argparse `dest`) to option strings, e.g. {"n_boot": "--n-boot"}; other
    backticked words (file names, column names) are left as they are.
    """
    return _PARAMETER.sub(lambda m: flags.get(m.group(1), m.group(0)), message)


_flags: Mapping[str, str] = {}  # the running command's parameter -> flag names (`shown_as_flags`); empty in Python


@contextlib.contextmanager
def shown_as_flags(flags: Mapping[str, str]) -> Iterator[None]:
    """While the block runs, `describe` names parameters by these flags (the command line sets its own)."""
    global _flags
    before, _flags = _flags, flags
    try:
        yield
    finally:
        _flags = before


def describe(error: BaseException | str) -> str:
    """The message of `error` as its reader typed the parameters: flags inside a command, else Python names."""
    return with_flag_names(str(error), _flags)

"""The error family: what vlm raises on purpose is a `VlmError` (and still the built-in a user catches), and the
command line alone turns parameter names into the flags the user typed."""

from __future__ import annotations

import pytest

import vlm
from vlm.cli import build_parser
from vlm.errors import InputError, MissingInputError, RunError, UsageError, VlmError, with_flag_names


def test_each_kind_is_a_vlm_error_and_the_builtin_a_user_catches() -> None:
    assert vlm.VlmError is VlmError
    for kind, builtin, code in [(InputError, ValueError, 2), (UsageError, ValueError, 2),
                                (MissingInputError, FileNotFoundError, 2), (RunError, RuntimeError, 1)]:  # fmt: skip
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

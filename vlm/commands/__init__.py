"""CLI subcommands, one module per pipeline stage; each defines `register(subparsers)`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlm.batch import BatchReport


def finish_batch(report: BatchReport, output: str | Path) -> int:
    """Tell the user what a per-slide batch did and where its failures are; exit code 1 if any failed."""
    print(f"{report.summary()} -> {output}")
    if report.failed:
        print(f"failures listed in {report.failures}")
        return 1
    return 0

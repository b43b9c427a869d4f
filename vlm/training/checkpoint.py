"""The run folder's state: checkpoints (with every RNG state), `metrics.jsonl`, and what a killed run left.

`checkpoints/last.pt` holds model, optimizer, scheduler, AMP scaler, RNG states and data position, so that a
resumed run continues with the same batches and random numbers as an uninterrupted one. It holds only tensors
and plain values and is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlm.errors import InputError, UsageError
from vlm.io import atomic_path, load_torch_file, recover_dir

log = logging.getLogger(__name__)

CHECKPOINT = Path("checkpoints") / "last.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, lists and numbers: what `torch.load(weights_only=True)` accepts, no pickle."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    """`checkpoints/last.pt` read with `weights_only=True`: tensors and plain values only, never code.

    A checkpoint holding any other pickled object (crafted, or written by a vlm that stored RNG states as
    numpy objects) is refused rather than unpickled, since unpickling can run arbitrary code.
    """
    state = load_torch_file(path, "vlm training checkpoint", fix="restart the run without --resume")
    if not isinstance(state, dict) or not {"model", "optimizer", "rng", "global_step"} <= set(state):
        raise InputError(f"{path}: not a vlm training checkpoint (keys model, optimizer, rng, ... missing)")
    return state


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    epoch: int,
    step_in_epoch: int,
    global_step: int,
    best: float,
    config: dict[str, Any],
    lr_extend_from: tuple[int, float] | None,
) -> None:
    """Write the state `load_checkpoint` reads: weights, optimisation state, every RNG state, and where the run
    stands (the next `epoch` and `step_in_epoch`, steps done, best validation score, its settings)."""
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "rng": rng_state(), "epoch": epoch, "step_in_epoch": step_in_epoch,
        "global_step": global_step, "best": best, "config": config, "lr_extend_from": lr_extend_from,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def remove_unfinished(out: Path) -> None:
    """Delete the `.*.part` files an interrupted run left in its folder (a checkpoint is ~0.2 GB).

    `atomic_path` writes under those names and renames only when complete, so a `.part` is never a finished
    output; the run about to start owns the folder. Folder outputs (`model/`, ...) stage inside themselves:
    `recover_dir` finishes a committed write there and removes what a kill left before the commit.
    """
    for folder in (p for p in out.iterdir() if p.is_dir()) if out.is_dir() else ():
        recover_dir(folder)
    parts = [p for folder in (out, out / CHECKPOINT.parent) if folder.is_dir() for p in folder.glob(".*.part")]
    parts = [p for p in parts if p.is_file()]
    size = sum(p.stat().st_size for p in parts)
    for part in parts:
        part.unlink(missing_ok=True)
    if parts:
        log.warning("%s: removed %d unfinished file(s) (%.1f MB) left by a killed run", out, len(parts), size / 1e6)


class MetricsLog:
    """Append-only `metrics.jsonl`; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        self.epochs: list[dict[str, Any]] = []  # the end-of-epoch records kept and written, in order
        if keep_until_step is not None and path.exists():  # every rank reads them; rank 0 alone rewrites
            kept = [line for line in self._records(path) if json.loads(line)["step"] <= keep_until_step]
            self.epochs = [record for record in map(json.loads, kept) if self._ends_epoch(record)]
            if enabled:
                with atomic_path(path) as tmp:
                    tmp.write_text("".join(line + "\n" for line in kept))
        elif enabled and keep_until_step is None:
            path.unlink(missing_ok=True)

    @staticmethod
    def _ends_epoch(record: dict[str, Any]) -> bool:
        """An epoch's record ("step", "epoch" and its validation metrics), not a step's (which has a loss)."""
        return "epoch" in record and "train/loss" not in record

    @staticmethod
    def _records(path: Path) -> list[str]:
        """The file's JSON lines; a final line cut short by a kill is dropped with a warning, any other bad
        line is an error naming it (the log was edited or damaged, not interrupted)."""
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise UsageError("no integer 'step'")
            except ValueError as error:
                if number == len(lines):
                    log.warning("%s: dropping an unfinished last line (%s) left by an interrupted run", path, error)
                    return lines[:-1]
                raise InputError(f"{path}: line {number} is not a metrics record ({error}); fix or remove it") from None
        return lines

    def write(self, record: dict[str, Any]) -> None:
        if self._ends_epoch(record):
            self.epochs.append(record)
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

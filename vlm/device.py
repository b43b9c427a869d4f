"""Device and precision, resolved in one place (no hidden `cuda:0` defaults elsewhere).

Why one module: every stage (tile encoder, slide encoder, training) must agree on what "auto" means and
on which autocast dtype a precision name maps to; norms and logit scales stay in fp32 under autocast.
"""

from __future__ import annotations

import contextlib
import os

import torch

from vlm.errors import UsageError
from vlm.settings import PRECISIONS


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" picks CUDA when available, else CPU; anything else is passed to `torch.device`.

    Asking for CUDA on a machine without it is an error rather than a silent fallback to CPU, so that a
    job meant for a GPU never runs for days on a CPU by accident.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {str(device)!r} was requested but CUDA is not available; use `device` cpu")
    return resolved


def resolve_shard_device(device: str | torch.device | None, shard_index: int, shard_count: int) -> torch.device:
    """`resolve_device`, then, for one of several shards on CUDA without an explicit index, its own GPU:
    torchrun's LOCAL_RANK, else the shard index modulo the number of GPUs."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None and shard_count > 1:
        local = int(os.environ.get("LOCAL_RANK", shard_index % torch.cuda.device_count()))
        resolved = torch.device("cuda", local)
    return resolved


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32.

    "auto" means bf16 on CUDA devices that support it (fp16 otherwise) and fp32 on CPU, where
    reduced precision is slower and changes results.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda":
        raise UsageError(f"precision {precision!r} needs a CUDA device; on {device.type} use fp32")
    return torch.float16 if precision == "fp16" else torch.bfloat16


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager[None]:
    """An autocast context for `precision` on `device` (a no-op for fp32)."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

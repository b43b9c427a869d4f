"""Several processes under `torchrun`: joining the process group, each rank's device, averaging gradients.

Every rank takes its slice of each global batch; open_clip's loss gathers the features of all ranks (with
gradient) and `average_gradients` averages the gradients as DDP would, done by hand so that GradCache's two
passes need no DDP hooks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Distributed:
    """This process's place among the torchrun ranks (rank 0 alone writes the run folder)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the torchrun process group (gloo on CPU, NCCL on GPU) when WORLD_SIZE > 1; each GPU rank takes
    the GPU of its LOCAL_RANK. Returns this process's rank and its device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), device
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return Distributed(dist.get_rank(), dist.get_world_size()), device


def average_gradients(model: nn.Module, world_size: int) -> None:
    """Mean of every gradient across ranks: what DDP does, done by hand so GradCache's passes need no hooks."""
    import torch.distributed as dist

    for param in model.parameters():
        if param.requires_grad:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad /= world_size

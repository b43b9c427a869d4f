"""Contrastive losses: a thin adapter over open_clip's `ClipLoss` and `SigLipLoss` (reused, not re-written).

The adapter hides the two losses' different call conventions (SigLIP also takes a logit bias) and builds
them for the current process's rank and world size, so that under DDP the features of every rank are
gathered (with gradient) and each rank computes the loss of its own rows against all columns.
"""

from __future__ import annotations

import math

from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor, nn

from vlm.errors import UsageError
from vlm.settings import LOSSES

SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def create_loss(name: str = "clip", rank: int = 0, world_size: int = 1) -> nn.Module:
    """open_clip's loss by name; `clip` = symmetric InfoNCE, `siglip` = pairwise sigmoid."""
    if name == "clip":
        return ClipLoss(local_loss=world_size > 1, gather_with_grad=world_size > 1, rank=rank, world_size=world_size)
    if name == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    raise UsageError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")


def contrastive_loss(
    loss_fn: nn.Module, slide: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Tensor | None = None
) -> Tensor:
    """Loss of normalised slide [B, D] and text [B, D] features; `logit_scale` is exp'd (the temperature)."""
    if isinstance(loss_fn, SigLipLoss):
        if logit_bias is None:
            raise UsageError("the SigLIP loss needs a model with a logit bias (create it with init_logit_bias)")
        return loss_fn(slide, text, logit_scale, logit_bias)
    return loss_fn(slide, text, logit_scale)

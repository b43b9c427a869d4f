"""Optimisation: AdamW's parameter groups and the learning-rate schedule, including a resumed run's extension.

The schedule is a linear warm-up then a cosine decay to 0. A run resumed with more epochs than it was planned
with does not restart at 0 nor jump: it ramps from where it stood to the cosine of the longer plan, and the
ramp is stored in the checkpoint (`lr_extend_from`) so that resuming the extended run continues it exactly.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: weight decay only on weight matrices.

    Excluded from decay (as open_clip and BERT recipes do): biases, norm weights, other 1-d parameters,
    the logit scale/bias, token and position embeddings and the CLS token — decaying them pulls
    temperatures and normalisers towards zero for no regularising benefit.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lowered = name.lower()
        exclude = param.ndim < 2 or "norm" in lowered or "logit_" in name or "embeddings" in name or "cls_token" in name
        (no_decay if exclude or "bias" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, extend_from: tuple[int, float] | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over `warmup` steps, then cosine decay to 0 at `total` steps.

    `extend_from=(step, factor)`: a run resumed with more epochs than it was planned with stood at `factor`
    (0 at the end of a finished run) at `step`. From there the factor ramps linearly over `warmup` steps to the
    cosine of the longer plan, then follows it to 0 at the new `total`: no step at 0, no jump.
    """

    def planned(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))

    def factor(step: int) -> float:
        if extend_from is not None and extend_from[0] <= step < extend_from[0] + warmup:
            start, start_factor = extend_from
            target = planned(start + warmup)
            return start_factor + (target - start_factor) * (step - start + 1) / warmup
        return planned(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resume_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    state: dict[str, Any],
    warmup: int,
    total: int,
    epochs: int,
    lr: float,
) -> tuple[torch.optim.lr_scheduler.LambdaLR, tuple[int, float] | None]:
    """The schedule of a resumed run at its checkpoint (`state`, after the optimizer was restored from it).

    When `epochs` differs from the checkpoint's plan (`--resume --epochs N`), the schedule continues smoothly
    from the learning rate the run stood at. Returns the scheduler and the extension to store in the next
    checkpoints (None for an unextended run).
    """
    scheduler.load_state_dict(state["scheduler"])
    extend_from = state.get("lr_extend_from")
    planned_epochs = int(state.get("config", {}).get("epochs", epochs))
    if planned_epochs != epochs:  # `--resume --epochs N`: continue the schedule smoothly
        extend_from = (int(state["global_step"]), scheduler.get_last_lr()[0] / lr)
        log.info("extending the run from %d to %d epochs: the learning rate ramps from %.3g over %d steps, "
                 "then follows the cosine of the longer run", planned_epochs, epochs,
                 scheduler.get_last_lr()[0], warmup)
    if extend_from is not None:
        scheduler = cosine_with_warmup(optimizer, warmup, total, extend_from=tuple(extend_from))
        scheduler.load_state_dict(state["scheduler"])
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler, extend_from

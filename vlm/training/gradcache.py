"""Gradient caching (GradCache, Gao et al. 2021): a contrastive batch larger than memory allows.

The contrastive loss couples every pair of the batch, so it cannot be split into independent
micro-batches. GradCache splits it in three passes instead:
1. embed every chunk without a graph (memory of one chunk at a time);
2. compute the loss on the full batch of embeddings and take its gradient w.r.t. the embeddings;
3. re-embed each chunk with a graph and back-propagate that cached gradient into the towers.
The parameter gradient equals the full-batch gradient exactly, because each chunk's recomputation
replays the random state (dropout) of its first pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from vlm.errors import UsageError

Encode = Callable[[Sequence[int]], Tensor]  # batch positions -> [len, D] embeddings


class RandState:
    """The CPU and CUDA random states at construction, replayable with `replay()`."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = list(range(torch.cuda.device_count())) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def chunks_of(n: int, chunk_size: int) -> list[range]:
    if chunk_size < 1:
        raise UsageError(f"chunk size must be >= 1, got {chunk_size}")
    return [range(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def contrastive_backward(
    encode_slides: Encode,
    encode_texts: Encode,
    n: int,
    loss_of: Callable[[Tensor, Tensor], Tensor],
    chunk_size: int | None = None,
    scale_loss: Callable[[Tensor], Tensor] = lambda loss: loss,
) -> Tensor:
    """Back-propagate the contrastive loss of a batch of `n` pairs; return the (unscaled) loss.

    `encode_*` embed the pairs at the given batch positions; `loss_of(slides, texts)` is the loss of the
    whole batch (it may use parameters such as the logit scale, which get their gradient directly).
    `chunk_size=None` (or >= n) is the plain single pass; smaller chunks use gradient caching.
    `scale_loss` applies AMP loss scaling before backward.
    """
    if chunk_size is None or chunk_size >= n:
        loss = loss_of(encode_slides(range(n)), encode_texts(range(n)))
        scale_loss(loss).backward()
        return loss.detach()
    parts = chunks_of(n, chunk_size)
    cached: dict[str, tuple[list[RandState], Tensor]] = {}
    for name, encode in (("slides", encode_slides), ("texts", encode_texts)):
        states, reps = [], []
        with torch.no_grad():
            for part in parts:
                states.append(RandState())
                reps.append(encode(part))
        cached[name] = (states, torch.cat(reps).detach().requires_grad_(True))
    slides, texts = cached["slides"][1], cached["texts"][1]
    loss = loss_of(slides, texts)
    scale_loss(loss).backward()
    for name, encode in (("slides", encode_slides), ("texts", encode_texts)):
        states, reps = cached[name]
        if reps.grad is None:  # the tower has no trainable path to the loss
            continue
        for part, state in zip(parts, states, strict=True):
            with state.replay():
                rep = encode(part)
            if rep.requires_grad:
                rep.backward(reps.grad[part.start : part.stop].to(rep.dtype))
    return loss.detach()

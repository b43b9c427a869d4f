"""Training batches that never hold two slides of one case, so a case's report is never its own negative.

A report describes a case (`Pairs.cases`: rows sharing a patient, report text or slide); with several slides
per case, plain shuffled batches put two slides of a case side by side and the contrastive loss then pushes
the case's report away from one of its own slides: the loss cannot fall below that floor and the slides'
embeddings are pulled apart for no reason. `case_batches` is a case-aware batch sampler instead (chosen over a
multi-positive loss, so open_clip's losses are used unchanged, and over case-level slide embeddings, so each
slide stays its own training example):

- every batch holds at most one slide of each case;
- every epoch visits every slide, except `n mod batch_size` left over (as plain batching drops), and, only
  when a case has more slides than the epoch has steps, that case's surplus (a different draw each epoch);
- the batches are a function of the positions' cases, the batch size and the generator alone, so every
  torchrun rank builds the same global batches (each takes its own rows of them, disjoint) and a resumed run
  continues with the same batches. GradCache needs nothing: the loss of the whole batch is unchanged in form.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def case_steps(cases: Sequence[int], batch_size: int) -> int:
    """Full batches per epoch: the most `m <= n // batch_size` for which `m` batches of `batch_size` rows,
    at most one per case, can be filled (each case gives at most `m` rows, one to each batch)."""
    sizes = np.bincount(np.unique(np.asarray(cases), return_inverse=True)[1])
    for m in range(len(cases) // batch_size, 0, -1):
        if int(np.minimum(sizes, m).sum()) >= m * batch_size:
            return m
    return 0


def case_batches(cases: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """`case_steps(cases, batch_size)` batches of positions into `cases`, at most one position per case each.

    Cases are laid out one after another (cases in random order, each case's positions shuffled, at most `m`
    of them) and position `p` of that layout goes to batch `p mod m`: a case's run of at most `m` consecutive
    places lands in `m` different batches. The first `m × batch_size` places fill the batches exactly.
    """
    m = case_steps(cases, batch_size)
    if m == 0:
        return []
    members: dict[int, list[int]] = {}
    for position, case in enumerate(cases):
        members.setdefault(case, []).append(position)
    groups = list(members.values())
    layout: list[int] = []
    for g in torch.randperm(len(groups), generator=generator).tolist():
        group = groups[g]
        layout += [group[i] for i in torch.randperm(len(group), generator=generator)[:m].tolist()]
    layout = layout[: m * batch_size]
    return [layout[j::m] for j in range(m)]

"""Projection heads: map a tower's output into the shared slide–text space.

Kept separate from the towers because slide embeddings are stored unprojected: a retrained
head changes every score without re-encoding a single slide.
"""

from __future__ import annotations

from torch import Tensor, nn

from vlm.errors import UsageError

PROJECTION_KINDS: tuple[str, ...] = ("linear", "mlp")


class ProjectionHead(nn.Module):
    """`linear`: one bias-free matrix (CLIP). `mlp`: Linear-GELU-Linear with a hidden width halfway
    between input and output (BiomedCLIP's text head), for towers whose output space differs more."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear") -> None:
        super().__init__()
        if kind not in PROJECTION_KINDS:
            raise UsageError(f"unknown projection kind {kind!r}; choose one of {', '.join(PROJECTION_KINDS)}")
        self.kind = kind
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, out_dim, bias=False)
        else:
            hidden = (in_dim + out_dim) // 2
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out_dim, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:  # [B, in_dim] -> [B, out_dim]
        return self.net(x)

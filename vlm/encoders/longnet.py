"""LongNet dilated attention and encoder layers, numerically the torchscale code used by Prov-GigaPath.

Why not the official code: it needs flash-attn (no CPU path), spreads every branch's output with
`diag_embed` (r× memory per branch) and has no masking for batches. Here each branch gathers its dilated
positions with strided views, runs one fused attention that also returns the log-sum-exp (so the branch
weights cost nothing extra), and is merged into a running softmax, so memory stays O(L).

Dilated attention (one branch, segment `s = min(segment, L)`, ratio `r`): zero-pad the sequence to a
multiple of `s`, zero-pad each segment to a multiple of `r`; head group `g = head // ceil(H / r)` attends
among positions `g, g+r, g+2r, …` of its segment. The zero-padded keys take part in the softmax (logit 0,
value 0), exactly as in the official code, which never masks them. Positions a branch does not cover get
output 0 and log-sum-exp −1e8. Branches combine as `Σ_b softmax_b(lse_b) · out_b`, the weights carrying
no gradient (as officially).

Batches: each sequence is attended with its own length (`lengths`), so a padded batch gives exactly what
each slide gives alone; the linear layers run on the padded batch and padded positions are never read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

UNCOVERED_LSE = -1e8  # log-sum-exp the official code gives positions a branch does not attend from
FFN_CHUNK = 4096  # tokens per FFN chunk at inference, so the [L, mlp_dim] activations stay bounded


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def attend(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention `[B, h, m, D]` with its log-sum-exp `[B, h, m]` (fp32), without an m×m matrix.

    CPU uses ATen's flash kernel (which returns the lse); CUDA uses the flash (fp16/bf16) or
    memory-efficient (fp32) kernels. Other devices fall back to a query-chunked exact softmax.
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
        return out, lse
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16):
            result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
        else:
            result = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
        return result[0], result[1][..., : q.shape[-2]]
    return attend_chunked(q, k, v)


def attend_chunked(q: Tensor, k: Tensor, v: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Exact attention in query chunks; the portable fallback of `attend`."""
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for start in range(0, q.shape[-2], chunk):
        scores = (q[..., start : start + chunk, :] @ k.transpose(-1, -2)).float() * scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype) @ v)
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def _dilated_branch(q: Tensor, k: Tensor, v: Tensor, segment: int, ratio: int) -> tuple[Tensor, Tensor]:
    """One (segment, ratio) branch for one sequence: q, k, v `[n, H, D]` -> out `[n, H, D]`, lse `[n, H]`."""
    n, heads, dim = q.shape
    s = min(segment, n)
    n_seg = _ceil_div(n, s)
    m = _ceil_div(s, ratio)  # positions per head group per segment
    per_group = _ceil_div(heads, ratio)  # heads per group (head count zero-padded to a multiple of ratio)
    groups = _ceil_div(heads, per_group)  # groups that hold real heads
    padded_heads = per_group * ratio

    def gather(x: Tensor) -> Tensor:  # [n, H, D] -> [n_seg * groups, per_group, m, D]
        x = F.pad(x, (0, 0, 0, padded_heads - heads, 0, n_seg * s - n)).view(n_seg, s, padded_heads, dim)
        x = F.pad(x, (0, 0, 0, 0, 0, m * ratio - s)).view(n_seg, m, ratio, ratio, per_group, dim)
        x = torch.diagonal(x, dim1=2, dim2=3)[..., :groups]  # [n_seg, m, per_group, D, groups]
        return x.permute(0, 4, 2, 1, 3).reshape(n_seg * groups, per_group, m, dim)

    out_sparse, lse_sparse = attend(gather(q), gather(k), gather(v))
    out = q.new_zeros(n_seg, m, ratio, ratio, per_group, dim)
    torch.diagonal(out, dim1=2, dim2=3)[..., :groups].copy_(
        out_sparse.view(n_seg, groups, per_group, m, dim).permute(0, 3, 2, 4, 1)
    )
    lse = lse_sparse.new_full((n_seg, m, ratio, ratio, per_group), UNCOVERED_LSE)
    torch.diagonal(lse, dim1=2, dim2=3)[..., :groups].copy_(
        lse_sparse.view(n_seg, groups, per_group, m).permute(0, 3, 2, 1)
    )
    # Segments are concatenated at their r-padded length `m * r`, not `s` (as officially): when `s` is not a
    # multiple of r and there are several segments, later segments' outputs land shifted. Reproduced, not
    # fixed, so that the pretrained weights see the numbers they were trained with.
    out = out.view(n_seg * m * ratio, padded_heads, dim)
    lse = lse.view(n_seg * m * ratio, padded_heads)
    return out[:n, :heads], lse[:n, :heads]


def dilated_attention(
    q: Tensor, k: Tensor, v: Tensor, segment_lengths: tuple[int, ...], dilated_ratios: tuple[int, ...]
) -> Tensor:
    """LongNet dilated attention of one sequence, `[n, H, D]` -> `[n, H, D]`.

    Branch outputs are merged into a running softmax over their log-sum-exps, so only one extra
    `[n, H, D]` buffer is alive at a time.
    """
    total = weight_sum = running_max = None
    for segment, ratio in zip(segment_lengths, dilated_ratios, strict=True):
        out, lse = _dilated_branch(q, k, v, segment, ratio)
        lse = lse.detach().to(torch.promote_types(lse.dtype, torch.float32))
        if running_max is None:
            running_max, weight_sum, total = lse, torch.ones_like(lse), out
            continue
        new_max = torch.maximum(running_max, lse)
        old_scale, new_scale = torch.exp(running_max - new_max), torch.exp(lse - new_max)
        weight_sum = weight_sum * old_scale + new_scale
        old_scale, new_scale = old_scale.unsqueeze(-1).to(out.dtype), new_scale.unsqueeze(-1).to(out.dtype)
        if torch.is_grad_enabled() and (total.requires_grad or out.requires_grad):
            total = total * old_scale + out * new_scale
        else:  # inference: update in place, no [n, H, D] temporaries
            total = total.mul_(old_scale).add_(out.mul_(new_scale))
        running_max = new_max
    return total / weight_sum.unsqueeze(-1).to(total.dtype)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's `DropPath`, inlined so the slide encoder does not import timm)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.rate)
        return x * keep / (1 - self.rate)


class DilatedAttention(nn.Module):
    """Multi-head dilated self-attention with torchscale's sub-LN (`inner_attn_ln`) before `out_proj`."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: tuple[int, ...],
        dilated_ratios: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.segment_lengths = tuple(segment_lengths)
        self.dilated_ratios = tuple(dilated_ratios)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.inner_attn_ln = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: Tensor, lengths: list[int]) -> Tensor:  # [B, L, E] -> [B, L, E]
        batch, length, embed_dim = x.shape
        shape = (batch, length, self.num_heads, embed_dim // self.num_heads)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        rows = []
        for b, n in enumerate(lengths):
            row = dilated_attention(q[b, :n], k[b, :n], v[b, :n], self.segment_lengths, self.dilated_ratios)
            rows.append(F.pad(row, (0, 0, 0, 0, 0, length - n)))
        attn = torch.stack(rows).view(batch, length, embed_dim)
        return self.out_proj(self.inner_attn_ln(attn))


class FeedForward(nn.Module):
    """fc1 -> exact GELU in fp32 -> sub-LN -> fc2 (torchscale FeedForwardNetwork with subln)."""

    def __init__(self, embed_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, embed_dim)
        self.ffn_layernorm = nn.LayerNorm(mlp_dim, eps=1e-5)
        self.dropout = nn.Dropout(dropout)

    def _block(self, x: Tensor) -> Tensor:
        hidden = self.fc1(x)
        hidden = F.gelu(hidden.float()).type_as(hidden)
        return self.dropout(self.fc2(self.ffn_layernorm(hidden)))

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or x.shape[-2] <= FFN_CHUNK:
            return self._block(x)
        # Inference on long slides: bound the [L, mlp_dim] hidden activations (4× the residual stream).
        return torch.cat([self._block(part) for part in x.split(FFN_CHUNK, dim=-2)], dim=-2)


class LongNetLayer(nn.Module):
    """Pre-LN block: `x += drop(out_proj(sub-LN(attn(LN(x)))))`; `x += drop(ffn(LN(x)))`."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        mlp_dim: int,
        segment_lengths: tuple[int, ...],
        dilated_ratios: tuple[int, ...],
        dropout: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.self_attn = DilatedAttention(embed_dim, num_heads, segment_lengths, dilated_ratios)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.ffn = FeedForward(embed_dim, mlp_dim, dropout)
        self.final_layer_norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, lengths: list[int]) -> Tensor:
        x = x + self.drop_path(self.dropout(self.self_attn(self.self_attn_layer_norm(x), lengths)))
        return x + self.drop_path(self.ffn(self.final_layer_norm(x)))


class LongNetEncoder(nn.Module):
    """A stack of LongNet layers plus the final `layer_norm`; returns every hidden state when asked."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        segment_lengths: tuple[int, ...],
        dilated_ratios: tuple[int, ...],
        dropout: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        rates = torch.linspace(0, drop_path, depth).tolist() if depth > 1 else [0.0]
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            LongNetLayer(embed_dim, num_heads, mlp_dim, segment_lengths, dilated_ratios, dropout, rate)
            for rate in rates
        )
        self.layer_norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.grad_checkpointing = False

    def forward(
        self, x: Tensor, lengths: list[int], reduce_states: Callable[[Tensor], Tensor] | None = None
    ) -> list[Tensor]:
        """`[last hidden state]` `[B, L, E]` (before `layer_norm`), or, with `reduce_states`, that function
        applied to the input (after dropout) and to every layer's output, in order. Reducing on the fly
        keeps one hidden state alive instead of depth + 1 (13 copies of a 40k-tile slide are 1.6 GB)."""
        x = self.dropout(x)
        reduced = [reduce_states(x)] if reduce_states else []
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, lengths, use_reentrant=False)
            else:
                x = layer(x, lengths)
            if reduce_states:
                reduced.append(reduce_states(x))
        return reduced if reduce_states else [x]

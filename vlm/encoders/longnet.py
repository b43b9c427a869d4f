"""LongNet dilated attention and encoder layers, numerically the torchscale code used by Prov-GigaPath.

Why not the official code: it needs flash-attn (no CPU path), spreads every branch's output with
`diag_embed` (r× memory per branch) and has no masking for batches. Here each branch gathers its dilated
positions with strided views, runs one fused attention that also returns the log-sum-exp (so the branch
weights cost nothing extra), and is merged into a running softmax (in place, on the entries the branch
covers, at inference), so memory stays O(L).

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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

UNCOVERED_LSE = -1e8  # log-sum-exp the official code gives positions a branch does not attend from
FFN_CHUNK = 4096  # tokens per FFN chunk at inference, so the [L, mlp_dim] activations stay bounded
_TokenWise = tuple[Callable[..., Tensor], Callable[..., Tensor]]  # a layer's two token-wise parts


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
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
    outs, lses = [], []
    for start in range(0, q.shape[-2], chunk):
        scores = (q[..., start : start + chunk, :] @ k.transpose(-1, -2)).to(softmax_dtype) * scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype) @ v)
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


@dataclass(frozen=True)
class _Part:
    """Consecutive length-`s` segments of tokens `[start, stop)`, whose slots begin at `slot`."""

    start: int
    stop: int
    s: int
    ratio: int
    heads: int
    slot: int
    zero_keys: int = 0  # all-zero keys every (segment, head group) also attends to

    @property
    def n_seg(self) -> int:
        return (self.stop - self.start) // self.s

    @property
    def m(self) -> int:  # positions per head group per segment
        return _ceil_div(self.s, self.ratio)

    @property
    def per_group(self) -> int:  # heads per group (the head count is zero-padded to a multiple of r)
        return _ceil_div(self.heads, self.ratio)

    @property
    def groups(self) -> int:  # groups that hold real heads
        return _ceil_div(self.heads, self.per_group)

    @property
    def slots(self) -> int:
        return self.n_seg * self.m * self.ratio

    def diagonal(self, buffer: Tensor) -> Tensor:
        """Covered entries of a slot-major buffer `[slots, H_pad, ...]`, as
        `[n_seg, m, per_group, ..., groups]`."""
        part = buffer[self.slot : self.slot + self.slots, : self.per_group * self.ratio]
        part = part.unflatten(0, (self.n_seg, self.m, self.ratio)).unflatten(3, (self.ratio, self.per_group))
        return torch.diagonal(part, dim1=2, dim2=3)[..., : self.groups]


def _parts(n: int, heads: int, segment: int, ratio: int) -> list[_Part]:
    """How one branch splits a length-n sequence.

    Officially the sequence is zero-padded to a multiple of `s = min(segment, n)`, each segment to a
    multiple of r, and the zero keys join the softmax. A partly filled last segment is attended over its
    own tokens (padded to a multiple of r) with the rest of its zero keys counted analytically, which for
    a 40k-tile slide skips most of the 32768-long branch's second segment. Segments sit at their r-padded
    length `m * r` in slot order, and token p reads slot p (as officially: when s is not a multiple of r
    and there are several segments, later segments' outputs land shifted — reproduced, not fixed, so the
    pretrained weights see the numbers they were trained with).
    """
    s = min(segment, n)
    full = n // s * s
    parts = [_Part(0, full, s, ratio, heads, slot=0)]
    if full < n:
        tail = n - full
        zero_keys = _ceil_div(s, ratio) - _ceil_div(tail, ratio)
        parts.append(_Part(full, n, tail, ratio, heads, slot=parts[0].slots, zero_keys=zero_keys))
    return parts


def _gather(x: Tensor, part: _Part) -> Tensor:
    """Dilated positions of one part: `[..., n, H, D]` -> `[..., n_seg * groups, per_group, m, D]`, one copy.

    Leading dimensions (q, k and v stacked) are gathered together: one pad and one copy instead of three.
    """
    heads, dim = x.shape[-2:]
    lead = x.ndim - 3
    padded_heads = part.per_group * part.ratio
    x = x[..., part.start : part.stop, :, :].unflatten(-3, (part.n_seg, part.s))  # [..., n_seg, s, H, D]
    if padded_heads > heads or part.m * part.ratio > part.s:
        x = F.pad(x, (0, 0, 0, padded_heads - heads, 0, part.m * part.ratio - part.s))
    x = x.unflatten(-3, (part.m, part.ratio)).unflatten(-2, (part.ratio, part.per_group))  # [.., m, r, r, pg, D]
    x = torch.diagonal(x, dim1=-4, dim2=-3)[..., : part.groups]  # [..., n_seg, m, per_group, D, groups]
    order = (*range(lead), lead, lead + 4, lead + 2, lead + 1, lead + 3)  # [..., n_seg, groups, pg, m, D]
    return x.permute(order).reshape(*x.shape[:lead], part.n_seg * part.groups, part.per_group, part.m, dim)


def _part_attention(qkv: Tensor, part: _Part) -> tuple[Tensor, Tensor]:
    """Attention of one part of `qkv` `[3, n, H, D]`: out `[n_seg, m, per_group, D, groups]`, lse
    `[n_seg, m, per_group, groups]`."""
    dim = qkv.shape[-1]
    q, k, v = _gather(qkv, part).unbind(0)
    out, lse = attend(q, k, v)
    if part.zero_keys:
        # Each zero key adds exp(q·0) = 1 to the softmax denominator and nothing to the numerator.
        new_lse = torch.logaddexp(lse, lse.new_tensor(math.log(part.zero_keys)))
        out = out * torch.exp(lse - new_lse).unsqueeze(-1).to(out.dtype)
        lse = new_lse
    shape = (part.n_seg, part.groups, part.per_group, part.m)
    return out.view(*shape, dim).permute(0, 3, 2, 4, 1), lse.detach().view(shape).permute(0, 3, 2, 1)


def dilated_attention(
    q: Tensor, k: Tensor, v: Tensor, segment_lengths: tuple[int, ...], dilated_ratios: tuple[int, ...]
) -> Tensor:
    """LongNet dilated attention of one sequence, `[n, H, D]` -> `[n, H, D]`.

    Branches are merged into a running softmax over their log-sum-exps (weights without gradient, as
    officially). At inference the merge updates only the entries each branch covers, in place; with
    autograd each branch is scattered into a dense output first.
    """
    return dilated_attention_qkv(torch.stack([q, k, v]), segment_lengths, dilated_ratios)


def dilated_attention_qkv(qkv: Tensor, segment_lengths: tuple[int, ...], dilated_ratios: tuple[int, ...]) -> Tensor:
    """`dilated_attention` of q, k, v stacked as `[3, n, H, D]` (any strides: e.g. a view of one fused
    projection), so that each part gathers its dilated positions of all three in one copy."""
    _, n, heads, dim = qkv.shape
    q = qkv[0]
    branches = [_parts(n, heads, seg, r) for seg, r in zip(segment_lengths, dilated_ratios, strict=True)]
    slots = max(part.slot + part.slots for parts in branches for part in parts)
    padded_heads = max(part.per_group * part.ratio for parts in branches for part in parts)
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    running_max = q.new_full((slots, padded_heads), UNCOVERED_LSE, dtype=lse_dtype)
    weight_sum = q.new_zeros((slots, padded_heads), dtype=lse_dtype)
    in_place = not (torch.is_grad_enabled() and qkv.requires_grad)
    total = q.new_zeros(slots, padded_heads, dim)
    for index, parts in enumerate(branches):
        if not in_place:
            dense_out = q.new_zeros(slots, padded_heads, dim)
            dense_lse = running_max.new_full((slots, padded_heads), UNCOVERED_LSE)
        for part in parts:
            out, lse = _part_attention(qkv, part)
            if in_place and index == 0:  # nothing merged yet: the merge below would give exactly these
                part.diagonal(running_max).copy_(lse)
                part.diagonal(weight_sum).fill_(1.0)
                part.diagonal(total).copy_(out)
            elif in_place:  # uncovered entries would get weight exp(-1e8 - max) = 0: skip them
                old_max, sums, acc = (
                    part.diagonal(running_max),
                    part.diagonal(weight_sum),
                    part.diagonal(total),
                )
                new_max = torch.maximum(old_max, lse)
                old_scale, new_scale = torch.exp(old_max - new_max), torch.exp(lse - new_max)
                sums.mul_(old_scale).add_(new_scale)
                acc.mul_(old_scale.unsqueeze(-2).to(acc.dtype)).addcmul_(out, new_scale.unsqueeze(-2).to(acc.dtype))
                old_max.copy_(new_max)
            else:
                part.diagonal(dense_out).copy_(out)
                part.diagonal(dense_lse).copy_(lse)
        if not in_place:
            new_max = torch.maximum(running_max, dense_lse)
            old_scale, new_scale = torch.exp(running_max - new_max), torch.exp(dense_lse - new_max)
            weight_sum = weight_sum * old_scale + new_scale
            total = total * old_scale.unsqueeze(-1).to(total.dtype) + dense_out * new_scale.unsqueeze(-1).to(
                total.dtype
            )
            running_max = new_max
    # Every covered entry has weight_sum >= 1 (its largest branch contributes exp(0)); a position no branch
    # covers (only possible without a ratio-1 branch) gets output 0, as officially.
    return total[:n, :heads] / weight_sum[:n, :heads].clamp(min=1.0).unsqueeze(-1).to(total.dtype)


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

    def project_qkv(self, x: Tensor) -> Tensor:  # [B, L, E] -> [3, B, L, H, D]
        """One fused q/k/v projection (one GEMM instead of three); the three stay separate parameters, so
        checkpoints keep their keys. The result's `[:, b]` is row b's `[3, L, H, D]`, a strided view."""
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        heads = (self.num_heads, x.shape[-1] // self.num_heads)
        return F.linear(x, weight, bias).unflatten(-1, (3, *heads)).movedim(2, 0)

    def attend(self, qkv: Tensor, lengths: list[int]) -> Tensor:  # [3, B, L, H, D] -> [B, L, E]
        """Dilated attention of each row over its own `lengths[b]` tokens (padded positions stay 0)."""
        _, batch, length, heads, dim = qkv.shape
        segments, ratios = self.segment_lengths, self.dilated_ratios
        if lengths == [length] * batch:
            rows = [dilated_attention_qkv(qkv[:, b], segments, ratios) for b in range(batch)]
            attn = torch.stack(rows) if batch > 1 else rows[0][None]
        else:
            attn = qkv.new_zeros(qkv.shape[1:])
            for b, n in enumerate(lengths):
                attn[b, :n] = dilated_attention_qkv(qkv[:, b, :n], segments, ratios)
        return attn.reshape(batch, length, heads * dim)

    def project_out(self, attn: Tensor) -> Tensor:  # [B, L, E] -> [B, L, E]
        return self.out_proj(self.inner_attn_ln(attn))

    def forward(self, x: Tensor, lengths: list[int]) -> Tensor:  # [B, L, E] -> [B, L, E]
        return self.project_out(self.attend(self.project_qkv(x), lengths))


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

    def attention_input(self, x: Tensor) -> Tensor:  # [B, L, E] -> [3, B, L, H, D]
        """The token-wise part before the attention: pre-LN and the q/k/v projection."""
        return self.self_attn.project_qkv(self.self_attn_layer_norm(x))

    def attention_output_and_ffn(self, x: Tensor, attn: Tensor) -> Tensor:
        """The token-wise rest of the block: sub-LN, `out_proj`, both residuals and the FFN."""
        x = x + self.drop_path(self.dropout(self.self_attn.project_out(attn)))
        return x + self.drop_path(self.ffn(self.final_layer_norm(x)))

    def forward(self, x: Tensor, lengths: list[int], token_wise: _TokenWise | None = None) -> Tensor:
        """`token_wise`: compiled versions of the two token-wise parts (see `LongNetEncoder.compile_token_wise`)."""
        before, after = token_wise or (LongNetLayer.attention_input, LongNetLayer.attention_output_and_ffn)
        return after(self, x, self.self_attn.attend(before(self, x), lengths))


class LongNetEncoder(nn.Module):
    """A stack of LongNet layers plus the final `layer_norm`; returns every hidden state when asked."""

    def __init__(self, depth: int, drop_path: float, **layer: Any) -> None:
        """`layer`: the arguments of every `LongNetLayer` but its `drop_path`, which rises linearly from 0 to
        `drop_path` over the `depth` layers."""
        super().__init__()
        rates = torch.linspace(0, drop_path, depth).tolist() if depth > 1 else [0.0]
        self.dropout = nn.Dropout(layer["dropout"])
        self.layers = nn.ModuleList(LongNetLayer(**layer, drop_path=rate) for rate in rates)
        embed_dim = layer["embed_dim"]
        self.layer_norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.grad_checkpointing = False
        self.token_wise: _TokenWise | None = None

    def compile_token_wise(self, enable: bool = True) -> None:
        """Run each layer's token-wise parts (LNs, projections, FFN: a dozen kernels each) through
        `torch.compile(dynamic=True)` at inference; the dilated attention stays eager.

        Why not the whole encoder: its per-branch segment arithmetic makes every slide length a new graph
        (dynamic shapes did not finish compiling the tiny preset in 400 s on CPU), while the token-wise parts
        compile once for all lengths (a second graph past `FFN_CHUNK` tokens) and are shared by all layers.
        Numbers match eager to float rounding. Used only without autograd (`torch.no_grad` / inference mode).
        """
        if not enable:
            self.token_wise = None
            return
        self.token_wise = (
            torch.compile(LongNetLayer.attention_input, dynamic=True),
            torch.compile(LongNetLayer.attention_output_and_ffn, dynamic=True),
        )

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
                x = layer(x, lengths, None if torch.is_grad_enabled() else self.token_wise)
            if reduce_states:
                reduced.append(reduce_states(x))
        return reduced if reduce_states else [x]

"""Prov-GigaPath slide encoder: tile features + 0.5-mpp coordinates -> one slide embedding.

Loads the official `slide_encoder.pth` (247 keys, strict) and reproduces the official forward pass
(`gigapath/slide_encoder.py` + torchscale LongNet) without flash-attn, without the 3 GB positional table,
with O(L) memory, on CPU or GPU. Architecture lives in `SlideEncoderConfig` presets; weights are separate.

Pooling (`pool=`): `"mean"` (default; the authors recommend it, the CLS token was not trained in
pretraining) = `norm(mean over tiles of layer_norm(h_12))`, the official `global_pool=True`;
`"cls"` = `norm(layer_norm(h_12))[:, 0]`, the official default output; `"all-layers"` = for
`h_0` (the input embedding) then `h_1 … h_12` in order, `norm(mean over tiles of h_i)` (no
`layer_norm`), concatenated: the official `all_layer_embed=True` with `global_pool=True`.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from vlm.encoders.longnet import LongNetEncoder
from vlm.encoders.positions import sincos_positions, to_gigapath_coords
from vlm.errors import InputError, MissingInputError, UsageError
from vlm.io import load_torch_file
from vlm.settings import POOLS
from vlm.weights import load_state_strict

__all__ = [
    "POOLS",
    "SLIDE_ENCODER_PRESETS",
    "GigaPathSlideEncoder",
    "SlideEncoderConfig",
    "create_slide_encoder",
    "load_slide_encoder_weights",
    "to_gigapath_coords",
]

log = logging.getLogger(__name__)

HUB_REPO = "prov-gigapath/prov-gigapath"
HUB_FILENAME = "slide_encoder.pth"


@dataclass(frozen=True)
class SlideEncoderConfig:
    """Architecture of a GigaPath-style slide encoder; the defaults are `gigapath_slide_enc12l768d`."""

    in_dim: int = 1536
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 16
    mlp_dim: int = 3072
    # 2**linspace(log2(1024), log2((262144 // 256)**2), 5) cast to int, as the official code derives them.
    segment_lengths: tuple[int, ...] = (1024, 5792, 32768, 185363, 1048576)
    dilated_ratios: tuple[int, ...] = (1, 2, 4, 8, 16)
    grid_size: int = 1000  # positions cover grid_size × grid_size tiles
    tile_size: int = 256  # px at 0.5 mpp per grid cell
    dropout: float = 0.25
    drop_path: float = 0.1

    def __post_init__(self) -> None:
        if len(self.segment_lengths) != len(self.dilated_ratios) or not self.segment_lengths:
            raise UsageError("segment_lengths and dilated_ratios must be non-empty and of equal length")
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise UsageError(f"embed_dim {self.embed_dim} must divide by num_heads {self.num_heads} and by 4")


SLIDE_ENCODER_PRESETS: dict[str, SlideEncoderConfig] = {
    "gigapath": SlideEncoderConfig(),
    # Same code, small enough for tests and the demo; small segments exercise every branch on short inputs.
    "tiny": SlideEncoderConfig(
        in_dim=32, embed_dim=64, depth=2, num_heads=4, mlp_dim=128,
        segment_lengths=(16, 37, 64, 150, 1024), dilated_ratios=(1, 2, 4, 8, 16),
    ),
}


class GigaPathSlideEncoder(nn.Module):
    """LongNet ViT over tile features; parameter names match the official checkpoint key for key."""

    def __init__(self, config: SlideEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(config.in_dim, config.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.encoder = LongNetEncoder(
            config.depth, config.drop_path, embed_dim=config.embed_dim, num_heads=config.num_heads,
            mlp_dim=config.mlp_dim, segment_lengths=config.segment_lengths, dilated_ratios=config.dilated_ratios,
            dropout=config.dropout,
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation (xavier linears, sub-LN gain), for training from scratch."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        gain = math.sqrt(math.log(self.config.depth * 2))
        with torch.no_grad():
            for name, param in self.encoder.named_parameters():
                if any(part in name for part in ("fc1", "fc2", "out_proj", "v_proj")):
                    param.mul_(gain)

    def pooled_dim(self, pool: str = "mean") -> int:
        """Width of the embedding `forward` returns for `pool`."""
        _check_pool(pool)
        layers = self.config.depth + 1 if pool == "all-layers" else 1
        return layers * self.config.embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in backward instead of storing its activations (training on long slides)."""
        self.encoder.grad_checkpointing = enable

    def forward(
        self,
        features: Tensor,  # [B, L, in_dim]
        coords: Tensor,  # [B, L, 2] (x, y) px at 0.5 mpp
        padding_mask: Tensor | None = None,  # [B, L] bool, True = padding, only at the end of a row
        pool: str = "mean",
    ) -> Tensor:  # [B, pooled_dim(pool)]
        """Embed a batch of slides; rows may be right-padded (see `padding_mask`).

        Each slide's attention runs over its own tiles only, so a batch gives each slide the same numbers
        as running it alone (including the official unmasked zero-padding inside LongNet segments).
        """
        _check_pool(pool)
        lengths = self._check_inputs(features, coords, padding_mask)
        valid = (
            torch.arange(features.shape[1], device=features.device)[None, :]
            < features.new_tensor(lengths, dtype=torch.long)[:, None]
        )  # [B, L]
        coords = coords.masked_fill(~valid[..., None], 0)
        positions = sincos_positions(coords, self.config.embed_dim, self.config.tile_size, self.config.grid_size)
        x = self.patch_embed.proj(features) + positions.to(features.dtype)
        # Padding may hold anything (even NaN); zero it so that it cannot reach a mean.
        x = x.masked_fill(~valid[..., None], 0)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1).to(x.dtype), x], dim=1)  # [B, 1 + L, E]
        token_lengths = [n + 1 for n in lengths]
        # Means in fp32 even under autocast: a bf16 sum over 40k tiles would lose the embedding's precision.
        weights = valid.float() / torch.tensor(lengths, device=x.device, dtype=torch.float32).unsqueeze(1)

        def mean_over_tiles(hidden: Tensor) -> Tensor:  # [B, 1 + L, E] -> [B, E]
            with torch.autocast(hidden.device.type, enabled=False):
                return torch.einsum("bl,ble->be", weights, hidden[:, 1:].float())

        if pool == "all-layers":
            pooled = self.encoder(x, token_lengths, reduce_states=mean_over_tiles)
            return torch.cat([self.norm(state) for state in pooled], dim=-1)
        (hidden,) = self.encoder(x, token_lengths)
        hidden = self.encoder.layer_norm(hidden)
        return self.norm(hidden[:, 0] if pool == "cls" else mean_over_tiles(hidden))

    def _check_inputs(self, features: Tensor, coords: Tensor, padding_mask: Tensor | None) -> list[int]:
        """Validate shapes and values; return each row's number of real tiles."""
        if features.ndim != 3 or features.shape[-1] != self.config.in_dim:
            raise InputError(
                f"features must have shape [B, L, {self.config.in_dim}], got {tuple(features.shape)}; "
                "the slide encoder expects tile features of its in_dim (1536 for Prov-GigaPath tiles)"
            )
        if coords.shape != (*features.shape[:2], 2):
            raise InputError(
                f"coords must have shape [B, L, 2] = {(*features.shape[:2], 2)} to match the features, "
                f"got {tuple(coords.shape)}"
            )
        batch, length = features.shape[:2]
        if length == 0:
            raise UsageError("no tiles: a slide needs at least one tile feature to embed")
        if padding_mask is None:
            lengths = [length] * batch
        else:
            if padding_mask.shape != (batch, length) or padding_mask.dtype != torch.bool:
                raise UsageError(f"padding_mask must be a bool tensor [B, L] = {(batch, length)}")
            lengths = (~padding_mask).sum(1).tolist()
            expected = (
                torch.arange(length, device=padding_mask.device)[None, :]
                >= padding_mask.new_tensor(lengths, dtype=torch.long)[:, None]
            )
            if not torch.equal(expected, padding_mask):
                raise InputError("padding_mask must mark only trailing positions (right padding) of each row")
            if min(lengths) == 0:
                raise InputError("a row of the batch is all padding; every slide needs at least one tile")
        valid_features = features if padding_mask is None else features[~padding_mask]
        if not bool(torch.isfinite(valid_features).all()):
            raise InputError("features contain NaN or inf; re-extract the tile features of this slide")
        return lengths


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise UsageError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")


def load_slide_encoder_weights(model: GigaPathSlideEncoder, checkpoint: str | Path) -> None:
    """Load an official `slide_encoder.pth` (`{"model": state_dict}`) or a bare state dict, strictly.

    Loaded with `weights_only=True`: a checkpoint is data, never code to execute.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such slide-encoder checkpoint")
    state = load_torch_file(path, "slide-encoder checkpoint")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(state).__name__}")
    load_state_strict(
        model, state, str(path), f"pick the preset the checkpoint was trained with (this one: {model.config})"
    )
    log.info("loaded slide encoder weights from %s", path)


def create_slide_encoder(
    name: str = "gigapath",
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    **overrides: object,
) -> GigaPathSlideEncoder:
    """A slide encoder from a preset name, in eval mode (call `.train()` to fine-tune).

    `checkpoint` loads a local file; `pretrained=True` without one downloads `slide_encoder.pth` from the
    gated hub repo `prov-gigapath/prov-gigapath` (needs `huggingface-cli login` and accepted terms).
    `overrides` replace config fields, e.g. `in_dim=32` for the tiny preset.
    """
    if name not in SLIDE_ENCODER_PRESETS:
        close = difflib.get_close_matches(name, SLIDE_ENCODER_PRESETS, n=3, cutoff=0.3)
        raise UsageError(
            f"unknown slide encoder {name!r}; close matches: {close or 'none'}; "
            f"available: {', '.join(SLIDE_ENCODER_PRESETS)}"
        )
    model = GigaPathSlideEncoder(replace(SLIDE_ENCODER_PRESETS[name], **overrides))
    if checkpoint is None and pretrained:
        if name != "gigapath":
            raise InputError(f"slide encoder {name!r} has no published weights; pass checkpoint=")
        from huggingface_hub import hf_hub_download

        from vlm.hub import hub_weights

        with hub_weights("the 'gigapath' slide encoder", HUB_REPO, gated=True):
            checkpoint = hf_hub_download(HUB_REPO, HUB_FILENAME)
    if checkpoint is not None:
        load_slide_encoder_weights(model, checkpoint)
    return model.eval()

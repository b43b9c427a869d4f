"""Tile encoders behind one registry, created by name.

- `gigapath`: the Prov-GigaPath tile encoder (timm `vit_giant_patch14_dinov2` at 224 px, patch 16,
  1536-d CLS output, 1.13 B parameters). Weights from the gated hub repo `prov-gigapath/prov-gigapath`
  (needs `huggingface-cli login`) or from a local file with `checkpoint=`.
- `timm:<model_name>`: any timm model, with its own pretrained weights or a local checkpoint.

Architecture and preprocessing travel together in `TileEncoderSpec`, so a model cannot be paired with
the wrong normalisation. Tests build the very same classes small with `pretrained=False` and
architecture overrides (e.g. `embed_dim=32, depth=2, num_heads=2`).
"""

from __future__ import annotations

import difflib
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision import transforms

from vlm.hub import hub_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TileEncoderSpec:
    """A named tile encoder: timm architecture + arguments, weight source and preprocessing."""

    timm_name: str
    hub_id: str | None
    model_args: dict[str, Any] = field(default_factory=dict)
    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


TILE_ENCODERS: dict[str, TileEncoderSpec] = {
    # DESIGN §4; matches the hub repo's config.json.
    "gigapath": TileEncoderSpec(
        timm_name="vit_giant_patch14_dinov2",
        hub_id="prov-gigapath/prov-gigapath",
        model_args=dict(
            img_size=224, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
            init_values=1e-5, mlp_ratio=5.33334, num_classes=0,
        ),
    ),
}


class TileEncoder(nn.Module):
    """A timm backbone returning one vector per tile, plus the transform its weights expect."""

    def __init__(self, name: str, model: nn.Module, transform: transforms.Compose) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.transform = transform

    @property
    def output_dim(self) -> int:
        # timm models with a pre-logits stage (MobileNetV3, ConvNeXt heads) output head_hidden_size, not num_features
        return int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, D]
        return self.model(images)


def _spec_transform(spec: TileEncoderSpec) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(spec.resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(spec.crop_size),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])


def _timm_hub_repo(model_name: str) -> tuple[str, bool]:
    """The hub repo a timm model's pretrained weights come from, and whether it is gated."""
    from timm.models import get_pretrained_cfg

    if model_name.startswith("hf_hub:"):
        return model_name.removeprefix("hf_hub:"), False  # unknown: a user's own repo may or may not be gated
    cfg = get_pretrained_cfg(model_name)
    return (getattr(cfg, "hf_hub_id", None) or f"timm/{model_name}"), False  # timm's own weights are public


def _create_named(name: str, checkpoint: str | None, pretrained: bool, overrides: dict[str, Any]) -> TileEncoder:
    import timm

    spec = TILE_ENCODERS[name]
    model_args = {**spec.model_args, **overrides}
    if checkpoint is None and pretrained:
        with hub_weights(f"the {name!r} tile encoder", spec.hub_id, gated=True):
            model = timm.create_model(f"hf_hub:{spec.hub_id}", pretrained=True, **overrides)
    else:
        model = timm.create_model(spec.timm_name, pretrained=False, checkpoint_path=checkpoint, **model_args)
    return TileEncoder(name, model.eval(), _spec_transform(spec))


def _create_timm(model_name: str, checkpoint: str | None, pretrained: bool, overrides: dict[str, Any]) -> TileEncoder:
    import timm
    from timm.data import create_transform, resolve_model_data_config

    if model_name not in timm.list_models() and not model_name.startswith("hf_hub:"):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5)
        raise ValueError(f"unknown timm model {model_name!r}; close matches: {', '.join(close) or 'none'}")
    from_hub = pretrained and checkpoint is None
    repo, gated = _timm_hub_repo(model_name) if from_hub else ("", False)
    with hub_weights(f"the 'timm:{model_name}' tile encoder", repo, gated=gated) if from_hub else nullcontext():
        model = timm.create_model(
            model_name, pretrained=from_hub, checkpoint_path=checkpoint, num_classes=0, **overrides
        )
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    return TileEncoder(f"timm:{model_name}", model.eval(), transform)


def create_tile_encoder(
    name: str = "gigapath",
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    **overrides: Any,
) -> TileEncoder:
    """Create a tile encoder by registry name (`gigapath`) or `timm:<model_name>`.

    `checkpoint` loads local weights (for air-gapped sites); `pretrained=False` with no checkpoint
    gives random weights (tests); `overrides` change the architecture (tiny test models).
    """
    checkpoint_path = None if checkpoint is None else os.fspath(checkpoint)
    if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"tile encoder checkpoint {checkpoint_path}: no such file")
    if name.startswith("timm:") or name in TILE_ENCODERS:
        create = _create_timm if name.startswith("timm:") else _create_named
        try:
            return create(name.removeprefix("timm:"), checkpoint_path, pretrained, overrides)
        except RuntimeError as error:  # torch's load_state_dict reports mismatches as RuntimeError
            raise ValueError(
                f"tile encoder checkpoint {checkpoint_path} does not fit the {name!r} architecture: {error}"
            ) from error
    known = [*TILE_ENCODERS, "timm:<model_name>"]
    close = difflib.get_close_matches(name, list(TILE_ENCODERS), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown tile encoder {name!r}; known: {', '.join(known)}.{hint}")

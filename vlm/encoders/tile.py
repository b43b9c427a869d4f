"""Tile encoders behind one registry, created by name.

- `gigapath`: the Prov-GigaPath tile encoder (timm `vit_giant_patch14_dinov2` at 224 px, patch 16,
  1536-d CLS output, 1.13 B parameters). Weights from the gated hub repo `prov-gigapath/prov-gigapath`
  (needs `huggingface-cli login`) or from a local file with `checkpoint=`.
- `timm:<model_name>`: any timm model, with its own pretrained weights or a local checkpoint.

Both are timm configuration: a registry entry is a timm architecture, its arguments and its data config
(`pretrained_cfg`: input size, interpolation, crop, mean, std), and every encoder takes its transform from
timm's data config (`resolve_model_data_config` + `create_transform`), so a model cannot be paired with
the wrong normalisation. Tests build the very same classes small with `pretrained=False` and
architecture overrides (e.g. `embed_dim=32, depth=2, num_heads=2`).
"""

from __future__ import annotations

import difflib
import os
import pickle
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision import transforms

from vlm.errors import InputError, MissingInputError, UsageError, VlmError
from vlm.hub import hub_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TileEncoderSpec:
    """A named tile encoder as timm configuration: architecture + arguments, weight source, data config."""

    timm_name: str
    hub_id: str | None
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)  # timm data config keys


TILE_ENCODERS: dict[str, TileEncoderSpec] = {
    # Matches the hub repo's config.json; its README preprocesses with Resize(256, bicubic) + CenterCrop(224).
    "gigapath": TileEncoderSpec(
        timm_name="vit_giant_patch14_dinov2",
        hub_id="prov-gigapath/prov-gigapath",
        model_args=dict(
            img_size=224, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
            init_values=1e-5, mlp_ratio=5.33334, num_classes=0,
        ),
        pretrained_cfg=dict(
            input_size=(3, 224, 224), interpolation="bicubic", crop_pct=224 / 256, crop_mode="center",
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
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


def _timm_transform(model: nn.Module) -> Any:
    """The eval transform timm derives from the model's data config (its own or the registry's)."""
    from timm.data import create_transform, resolve_model_data_config

    return create_transform(**resolve_model_data_config(model), is_training=False)


class TensorTransform:
    """The encoder's PIL transform, step for step, on a batch of uint8 tiles [B, H, W, 3] on any device.

    Built from the torchvision `Compose` (the one definition of the preprocessing): Resize runs torchvision's
    antialiased tensor resize in PIL's two passes (a resize to the size a tile already has is skipped, as on
    the PIL path), CenterCrop is CenterCrop, ToTensor becomes /255, Normalize is Normalize. Pixels match the
    PIL path to +-1 grey level (exactly when nothing is resized).
    """

    def __init__(self, steps: list[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self.steps = steps

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise UsageError(f"expected uint8 tiles [B, H, W, 3], got {tuple(tiles.shape)} {tiles.dtype}")
        x = tiles.permute(0, 3, 1, 2)
        for step in self.steps:
            x = step(x)
        return x


class _SeparableResize:
    """torchvision `Resize` on uint8 tensors the way PIL computes it: horizontal pass, round to uint8, vertical.

    One 2-D tensor resize keeps the intermediate in float and differs from PIL by up to ~20 grey levels on
    sharp texture (bicubic overshoot that PIL clips between its passes); two passes match PIL to +-1.
    """

    def __init__(self, resize: transforms.Resize) -> None:
        self.resize = resize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import _compute_resized_output_size, resize

        height, width = x.shape[-2:]
        size = [self.resize.size] if isinstance(self.resize.size, int) else list(self.resize.size)
        out_h, out_w = _compute_resized_output_size((height, width), size, self.resize.max_size)
        if (out_h, out_w) == (height, width):  # e.g. GigaPath's Resize(256) of a 256-px tile
            return x
        mode = self.resize.interpolation
        if out_w != width:
            x = resize(x, [height, out_w], mode, antialias=True)
        if out_h != height:
            x = resize(x, [out_h, out_w], mode, antialias=True)
        return x


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255)


def tensor_transform(transform: Callable[..., Any]) -> TensorTransform | None:
    """`transform` for uint8 tile batches on the device, or None when it has a step without a tensor twin."""
    from timm.data.transforms import MaybeToTensor

    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    to_float = False
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, transforms.Resize) and not to_float and step.antialias is not False:
            steps.append(_SeparableResize(step))
        elif isinstance(step, transforms.CenterCrop) and not to_float:
            steps.append(step)
        elif isinstance(step, transforms.ToTensor | MaybeToTensor) and not to_float:
            steps.append(_to_float)
            to_float = True
        elif isinstance(step, transforms.Normalize) and to_float:
            steps.append(step)
        else:
            return None
    return TensorTransform(steps) if to_float else None


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
        model = timm.create_model(
            spec.timm_name, pretrained=False, checkpoint_path=checkpoint, pretrained_cfg_overlay=spec.pretrained_cfg,
            **model_args,
        )
    return TileEncoder(name, model.eval(), _timm_transform(model))


def _create_timm(model_name: str, checkpoint: str | None, pretrained: bool, overrides: dict[str, Any]) -> TileEncoder:
    import timm

    if not model_name.startswith("hf_hub:") and not timm.is_model(model_name):  # knows `arch.pretrained_tag`
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5)
        raise UsageError(f"unknown timm model {model_name!r}; close matches: {', '.join(close) or 'none'}")
    from_hub = pretrained and checkpoint is None
    repo, gated = _timm_hub_repo(model_name) if from_hub else ("", False)
    with hub_weights(f"the 'timm:{model_name}' tile encoder", repo, gated=gated) if from_hub else nullcontext():
        model = timm.create_model(
            model_name, pretrained=from_hub, checkpoint_path=checkpoint, num_classes=0, **overrides
        )
    return TileEncoder(f"timm:{model_name}", model.eval(), _timm_transform(model))


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
        raise MissingInputError(f"tile encoder checkpoint {checkpoint_path}: no such file")
    if name.startswith("timm:") or name in TILE_ENCODERS:
        create = _create_timm if name.startswith("timm:") else _create_named
        try:
            return create(name.removeprefix("timm:"), checkpoint_path, pretrained, overrides)
        except VlmError:  # already says what is wrong (e.g. WeightsUnavailable, a RunError)
            raise
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
            # torch.load of a cut-short file: RuntimeError (PytorchStreamReader), OSError, or EOFError when empty
            unreadable = not isinstance(error, RuntimeError) or "PytorchStreamReader" in str(error)
            if checkpoint_path is not None and unreadable:
                reason = str(error).splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
                raise InputError(
                    f"tile encoder checkpoint {checkpoint_path}: not a readable checkpoint ({reason}); "
                    "re-copy or re-download it"
                ) from error
            if not isinstance(error, RuntimeError):
                raise
            raise InputError(  # torch's load_state_dict reports mismatches as RuntimeError
                f"tile encoder checkpoint {checkpoint_path} does not fit the {name!r} architecture: {error}"
            ) from error
    known = [*TILE_ENCODERS, "timm:<model_name>"]
    close = difflib.get_close_matches(name, list(TILE_ENCODERS), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UsageError(f"unknown tile encoder {name!r}; known: {', '.join(known)}.{hint}")

"""The aligned slide–text model (CLIP-style): slide tower, text tower, projection heads, logit scale.

Two slide towers are possible, chosen by `SlideTextConfig.slide_encoder`:
- `None` (frozen, the fast path): the model holds no slide encoder and projects cached, unprojected slide
  embeddings from `vlm embed-slides` (`encode_slide_embeddings`);
- a GigaPath preset name: the slide encoder is part of the model and trained with it (`encode_slides`
  takes tile features and coordinates).

A saved model is a folder: `config.json` (this dataclass + the text model's Hugging Face config),
`model.safetensors` (every weight, with the config's hash and a checksum of the weights in its metadata)
and the tokenizer files. It is written to a temporary folder and renamed into place, so a crash never leaves
half a model behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm import __version__
from vlm.encoders.text import (
    TextEncoder,
    check_tokenizer,
    check_tokenizer_files,
    load_text_encoder,
    text_encoder_from_config,
    tokenizer_fingerprint,
)
from vlm.errors import InputError, MissingInputError, UsageError
from vlm.io import atomic_dir, recover_dir
from vlm.model.projection import ProjectionHead
from vlm.settings import DEFAULT_MAX_LENGTH, DEFAULT_TEXT_ENCODER
from vlm.weights import load_state_strict

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "vlm-slide-text"
FORMAT_VERSION = 1


CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07, as a log logit scale


@dataclass
class SlideTextConfig:
    """Architecture of a `SlideTextModel`; saved as `config.json` beside the weights."""

    slide_embed_dim: int = 768  # unprojected slide embedding width (GigaPath: 768)
    proj_dim: int = 512  # shared space
    text_model: str = DEFAULT_TEXT_ENCODER  # where the text weights came from (provenance only)
    text_config: dict[str, Any] = field(default_factory=dict)  # the text model's HF config, filled in at build
    max_length: int = DEFAULT_MAX_LENGTH  # tokens per report; longer ones are truncated
    slide_encoder: str | None = None  # GigaPath preset name, or None for cached (frozen) slide embeddings
    slide_encoder_config: dict[str, Any] | None = None  # the slide encoder's resolved config
    pool: str = "mean"  # slide encoder pooling (GigaPath authors recommend mean over CLS)
    slide_proj: str = "linear"
    text_proj: str = "mlp"
    init_logit_scale: float = CLIP_INIT_LOGIT_SCALE
    max_logit_scale: float = math.log(100)
    init_logit_bias: float | None = None  # set (SigLIP: -10) to learn a logit bias
    # {vocab_size, sha256, files} of the tokenizer saved beside the weights; checked on load. Not part of
    # `digest()` (not architecture), so folders saved before it existed still load (with a warning).
    tokenizer: dict[str, Any] | None = None
    # Frozen path: the slide encoder that made the cached embeddings (from the embeddings parquet: encoder,
    # config, pool, checkpoint, checkpoint_sha256, weights_sha256), so tile heatmaps can rebuild it.
    # Provenance, not architecture: left out of `digest`.
    slide_source: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vlm_version": __version__,
            **dataclasses.asdict(self),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> SlideTextConfig:
        """Parse a saved config, refusing other formats, newer versions and unknown keys."""
        values = dict(values)
        fmt = values.pop("format", None)
        version = values.pop("format_version", None)
        values.pop("vlm_version", None)
        if fmt != FORMAT:
            raise InputError(f"{source}: not a vlm slide-text model config (format={fmt!r}, expected {FORMAT!r})")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InputError(f"{source}: format_version {version!r} is newer than this vlm reads; upgrade vlm")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{source}: unknown config keys {unknown}; was it written by another tool or a newer vlm?")
        return cls(**values)

    def digest(self) -> str:
        """A hash of the architecture, stored in the weights file so a mismatched pair is refused."""
        values = dataclasses.asdict(self)
        values.pop("tokenizer")
        values.pop("slide_source")
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


class SlideTextModel(nn.Module):
    """Slide tower + text tower + projection heads + learnable temperature.

    `encode_*` methods return L2-normalised vectors in the shared space, ready for dot-product scores.
    """

    def __init__(self, config: SlideTextConfig, text: TextEncoder, slide_encoder: nn.Module | None = None) -> None:
        super().__init__()
        if (slide_encoder is None) != (config.slide_encoder is None):
            raise UsageError("config.slide_encoder and the slide_encoder module must be given together (or neither)")
        if slide_encoder is not None:
            embed_dim = int(slide_encoder.pooled_dim(config.pool))
            if embed_dim != config.slide_embed_dim:
                raise UsageError(
                    f"slide encoder outputs {embed_dim}-d but config.slide_embed_dim is {config.slide_embed_dim}"
                )
        # A copy: the caller's config is theirs (building two models from one config must not couple them).
        config = dataclasses.replace(
            config,
            text_config=text.model.config.to_dict(),
            slide_encoder_config=(
                config.slide_encoder_config if slide_encoder is None else dataclasses.asdict(slide_encoder.config)
            ),
        )
        text.max_length = config.max_length
        self.config = config
        self.slide_encoder = slide_encoder
        self.text = text
        self.slide_proj = ProjectionHead(config.slide_embed_dim, config.proj_dim, config.slide_proj)
        self.text_proj = ProjectionHead(text.width, config.proj_dim, config.text_proj)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(config.init_logit_bias))) if config.init_logit_bias is not None else None
        )

    @property
    def tokenizer(self) -> Any:
        return self.text.tokenizer

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def scale(self) -> Tensor:
        """exp(logit_scale), clamped at exp(max_logit_scale) = 100 so the softmax cannot collapse."""
        return self.logit_scale.clamp(max=self.config.max_logit_scale).exp()

    # --- slide side -------------------------------------------------------------------------------
    def encode_slide_embeddings(self, embeddings: Tensor) -> Tensor:
        """[B, slide_embed_dim] cached unprojected slide embeddings -> [B, proj_dim], L2-normalised."""
        if embeddings.shape[-1] != self.config.slide_embed_dim:
            raise UsageError(
                f"slide embeddings are {embeddings.shape[-1]}-d but the model expects "
                f"{self.config.slide_embed_dim}-d; "
                "were they made with a different slide encoder?"
            )
        weight = next(self.slide_proj.parameters())
        return _normalize(self.slide_proj(embeddings.to(weight.device, weight.dtype)))

    def embed_slides(self, features: Tensor, coords: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Tile features [B, L, in_dim] + 0.5-mpp px coords [B, L, 2] -> [B, slide_embed_dim], unprojected."""
        if self.slide_encoder is None:
            raise UsageError(
                "this model has no slide encoder (trained on cached slide embeddings); embed slides with "
                "`vlm embed-slides` and use encode_slide_embeddings"
            )
        return self.slide_encoder(features, coords, padding_mask, pool=self.config.pool)

    def encode_slides(self, features: Tensor, coords: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The full slide tower: tiles -> slide encoder -> projection -> L2-normalised [B, proj_dim]."""
        return _normalize(self.slide_proj(self.embed_slides(features, coords, padding_mask)))

    # --- text side --------------------------------------------------------------------------------
    def encode_tokens(self, tokens: dict[str, Tensor]) -> Tensor:
        """Tokenised texts (from `self.text.tokenize`) -> [B, proj_dim], L2-normalised (with grad)."""
        return _normalize(self.text_proj(self.text(**tokens)))

    @torch.no_grad()
    def encode_text(
        self, texts: Sequence[str], batch_size: int = 64, device: torch.device | str | None = None
    ) -> Tensor:
        """Tokenise, encode, project and normalise texts in eval mode -> [N, proj_dim] on `device`.

        `device` defaults to the model's device. Texts longer than `max_length` tokens are truncated and
        their number logged, since a cut report may lose the diagnosis at its end.
        """
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of texts, not a single string; wrap it in a list")
        device = torch.device(device) if device is not None else self.device
        truncated = self.text.count_truncated(texts) if len(texts) else 0
        if truncated:
            log.warning(
                "%d of %d texts exceed %d tokens and were truncated",
                truncated,
                len(texts),
                self.text.max_length,
            )
        was_training = self.training
        self.eval()
        try:
            chunks = [
                self.encode_tokens(self.text.tokenize(texts[i : i + batch_size], device=self.device)).to(device)
                for i in range(0, len(texts), batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, self.config.proj_dim, device=device)

    # --- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write config.json + model.safetensors + tokenizer files to `path` atomically; return `path`."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_dir(path) as tmp:
            written = self.text.tokenizer.save_pretrained(str(tmp))
            self.config.tokenizer = {
                **tokenizer_fingerprint(self.text.tokenizer),
                "files": sorted({Path(f).name for f in written if (tmp / Path(f).name).is_file()}),
            }
            config = self.config.to_dict()
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            save_file(
                state,
                str(tmp / WEIGHTS_NAME),
                metadata={
                    "format": "pt",
                    "vlm_config_sha256": self.config.digest(),
                    "vlm_weights_sha256": _state_digest(state),
                },
            )
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], device: torch.device | str | None = None) -> SlideTextModel:
        """Load a folder written by `save_pretrained` (no network); the model is returned in eval mode.

        The weights file must match config.json: same architecture hash, same tensor names and shapes.
        """
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = Path(path)
        recover_dir(path)  # finish a save that a kill interrupted (`atomic_dir`)
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for required in (config_file, weights_file):
            if not required.is_file():
                raise MissingInputError(
                    f"{required}: missing; pass the `model/` folder written by `vlm train` as `model`"
                )
        try:
            values = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise InputError(f"{config_file}: not valid JSON ({error})") from error
        config = SlideTextConfig.from_dict(values, source=str(config_file))
        try:
            with safe_open(str(weights_file), framework="pt") as handle:
                metadata = handle.metadata() or {}
            saved_digest = metadata.get("vlm_config_sha256")
            state = load_file(str(weights_file))
        except SafetensorError as error:  # damaged or cut short: one line naming the file, not a Rust traceback
            raise InputError(
                f"{weights_file}: not a readable safetensors file ({error}); re-save or re-copy the model folder"
            ) from error
        if saved_digest != config.digest():
            raise InputError(
                f"{weights_file} was not saved with this {CONFIG_NAME} (architecture hash differs); the "
                "folder mixes files of different models: re-save it with save_pretrained or restore the pair"
            )
        saved_weights = metadata.get("vlm_weights_sha256")  # absent in folders saved before it was recorded
        if saved_weights is not None and saved_weights != _state_digest(state):
            raise InputError(
                f"{weights_file}: its weights do not match the checksum saved with them (the file is damaged); "
                "re-copy the model folder or re-run `vlm train`"
            )
        check_tokenizer_files(config.tokenizer, path)
        text = text_encoder_from_config(config.text_config, path, max_length=config.max_length)
        check_tokenizer(text.tokenizer, config.tokenizer, path)
        slide_encoder = _build_slide_encoder(config) if config.slide_encoder is not None else None
        model = cls(config, text, slide_encoder)
        fix = "the weights and config.json are of different models"
        load_state_strict(model, state, str(weights_file), fix)
        if device is not None:
            model.to(device)
        return model.eval()


def _state_digest(state: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: safetensors itself checks no data, so a flipped
    byte in a weight would load as a silently different model."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _normalize(x: Tensor) -> Tensor:
    """L2-normalise in fp32: norms stay full precision under autocast."""
    return F.normalize(x.float(), dim=-1)


def _build_slide_encoder(config: SlideTextConfig, checkpoint: str | os.PathLike[str] | None = None) -> nn.Module:
    """Create the GigaPath slide encoder named in the config (random weights unless `checkpoint`)."""
    from vlm.encoders.slide import create_slide_encoder

    # JSON turns the config's tuples into lists; the dataclass wants its tuples back.
    saved = config.slide_encoder_config or {}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    return create_slide_encoder(config.slide_encoder, checkpoint=checkpoint, **overrides)


def create_model(
    text_encoder: str | os.PathLike[str] = DEFAULT_TEXT_ENCODER,
    slide_embed_dim: int | None = None,
    slide_encoder: str | None = None,
    slide_checkpoint: str | os.PathLike[str] | None = None,
    proj_dim: int = 512,
    max_length: int = DEFAULT_MAX_LENGTH,
    pool: str = "mean",
    init_logit_scale: float = CLIP_INIT_LOGIT_SCALE,
    init_logit_bias: float | None = None,
) -> SlideTextModel:
    """A fresh model for training: pretrained text weights, and either cached slide embeddings of
    `slide_embed_dim` (frozen path) or the GigaPath slide encoder preset `slide_encoder` (optionally
    loaded from `slide_checkpoint`). Projection heads and logit scale start from scratch."""
    text = load_text_encoder(text_encoder, max_length=max_length)
    encoder = None
    if slide_encoder is not None:
        encoder = _build_slide_encoder(
            SlideTextConfig(slide_encoder=slide_encoder, pool=pool), checkpoint=slide_checkpoint
        )
        slide_embed_dim = int(encoder.pooled_dim(pool))
    elif slide_checkpoint is not None:
        raise InputError("a slide checkpoint needs a slide encoder; pass `slide_encoder` (e.g. gigapath) too")
    if slide_embed_dim is None:
        raise UsageError("give slide_embed_dim (width of the cached slide embeddings) or a slide encoder preset")
    config = SlideTextConfig(
        slide_embed_dim=int(slide_embed_dim),
        proj_dim=proj_dim,
        text_model=str(text_encoder),
        max_length=max_length,
        slide_encoder=slide_encoder,
        pool=pool,
        init_logit_scale=init_logit_scale,
        init_logit_bias=init_logit_bias,
    )
    return SlideTextModel(config, text, encoder)

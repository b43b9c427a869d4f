"""Text tower: any Hugging Face BERT-family encoder, pooled by the CLS token of its last hidden state.

Why CLS of the last hidden state and not BERT's `pooler_output`: the pooler is a tanh layer trained for
next-sentence prediction; BiomedCLIP (the precedent for PubMedBERT in a CLIP model) pools the CLS hidden
state and lets the projection head do the rest. The pooler is therefore dropped at load time, so its
weights are neither trained nor saved.

The tokenizer travels with the model (`TextEncoder.tokenizer`) and is saved beside the weights, so a model
and its tokenizer cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.errors import InputError, MissingInputError, UsageError
from vlm.settings import DEFAULT_MAX_LENGTH

log = logging.getLogger(__name__)


class TextEncoder(nn.Module):
    """A transformer encoder plus its tokenizer; `forward` returns the CLS vector of the last layer."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        super().__init__()
        if max_length < 2:
            raise UsageError(f"max_length must be at least 2 (CLS + SEP), got {max_length}")
        model_max = getattr(model.config, "max_position_embeddings", None)
        if model_max is not None and max_length > model_max:
            raise UsageError(
                f"max_length {max_length} exceeds the text model's {model_max} positions; "
                f"use `max_length` <= {model_max}"
            )
        _drop_pooler(model)
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def width(self) -> int:
        """Dimension of the CLS vector (768 for PubMedBERT)."""
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Tokenise with truncation to `max_length` and padding to the longest text of the batch."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        keep = ("input_ids", "attention_mask", "token_type_ids")
        return {k: v.to(device) if device is not None else v for k, v in batch.items() if k in keep}

    def count_truncated(self, texts: Sequence[str]) -> int:
        """How many texts are longer than `max_length` tokens (special tokens included) and get cut."""
        lengths = self.tokenizer(list(texts), truncation=False, add_special_tokens=True, return_length=True)["length"]
        return sum(int(n) > self.max_length for n in lengths)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, width] CLS hidden state of the last layer."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.last_hidden_state[:, 0]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()

    def freeze(self, unfreeze_last: int = 0) -> None:
        """Freeze the transformer, then unfreeze its last `unfreeze_last` layers (0 = fully frozen).

        Embeddings and early layers stay frozen, which is the usual way to adapt a large pretrained text
        model on a few thousand reports without forgetting its language.
        """
        for param in self.model.parameters():
            param.requires_grad_(False)
        if unfreeze_last <= 0:
            return
        layers = _encoder_layers(self.model)
        if unfreeze_last > len(layers):
            raise UsageError(f"`unfreeze_text_last` {unfreeze_last} exceeds the text model's {len(layers)} layers")
        for layer in layers[-unfreeze_last:]:
            for param in layer.parameters():
                param.requires_grad_(True)


def _drop_pooler(model: nn.Module) -> None:
    """Remove BERT's tanh pooler (unused: we pool the CLS hidden state)."""
    if getattr(model, "pooler", None) is not None:
        model.pooler = None


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    """Transformer blocks of a BERT-family model (BERT `encoder.layer`, DistilBERT `transformer.layer`)."""
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers"):
        module: Any = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise UsageError(
        f"cannot find the transformer layers of {type(model).__name__} to unfreeze; use `freeze_text` or no freezing"
    )


def load_text_encoder(name_or_path: str | os.PathLike[str], max_length: int = DEFAULT_MAX_LENGTH) -> TextEncoder:
    """Load pretrained weights and tokenizer by hub id or local folder (offline works for local folders)."""
    from transformers import AutoModel, AutoTokenizer

    from vlm.hub import hub_weights

    name = str(name_or_path)
    if Path(name).is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModel.from_pretrained(name)
        except OSError as error:
            raise OSError(
                f"{name}: cannot load a text encoder from this folder ({error}); it needs config.json, weights "
                "and tokenizer files"
            ) from error
    else:  # a hub id: one clear message, fast, when the hub cannot be reached (public repos are not gated)
        with hub_weights(f"the text encoder {name!r}", name, gated=False, flag="--text-encoder", local="FOLDER"):
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModel.from_pretrained(name)
    return TextEncoder(model, tokenizer, max_length=max_length)


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> Any:
    """The tokenizer alone of a text encoder (hub id or local folder): counting tokens needs no weights."""
    from transformers import AutoTokenizer

    from vlm.hub import hub_weights

    name = str(name_or_path)
    if Path(name).is_dir():
        try:
            return AutoTokenizer.from_pretrained(name)
        except OSError as error:
            raise OSError(f"{name}: cannot load a tokenizer from this folder ({error})") from error
    with hub_weights(f"the tokenizer of {name!r}", name, gated=False, flag="--text-encoder", local="FOLDER"):
        return AutoTokenizer.from_pretrained(name)


def text_encoder_from_config(
    config: dict[str, Any], tokenizer_dir: str | os.PathLike[str], max_length: int = DEFAULT_MAX_LENGTH
) -> TextEncoder:
    """Build the architecture from a saved config dict with random weights (weights are loaded after)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    values = dict(config)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise InputError("the saved text config has no 'model_type'; the model folder is damaged, re-save it")
    hf_config = AutoConfig.for_model(model_type, **values)
    model = AutoModel.from_config(hf_config)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return TextEncoder(model, tokenizer, max_length=max_length)


# Mixed case, accents, punctuation, digits and a rare word: ids of this text change when lower-casing,
# accent stripping, splitting or the vocabulary change, so the fingerprint covers behaviour, not just size.
_TOKENIZER_PROBE = "Invasive Ductal CARCINOMA, grade 2 (pT1c): Müllerian naïve — 12.5% Ki-67; xylophone!"


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """`{"vocab_size": int, "sha256": str}` of a tokenizer: its vocabulary and the ids it gives a probe text.

    Recorded in a saved model's config and checked on load, because transformers silently builds a
    tokenizer of its 5 special tokens when `tokenizer.json` is missing; that model runs and is wrong.
    """
    import hashlib

    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(list(tokenizer(_TOKENIZER_PROBE)["input_ids"])).encode())
    return {"vocab_size": len(tokenizer), "sha256": digest.hexdigest()}


def check_tokenizer(tokenizer: Any, record: dict[str, Any] | None, folder: str | os.PathLike[str]) -> None:
    """Refuse a tokenizer that is not the one recorded when the model was saved (naming folder and files)."""
    if record is None:
        log.warning(
            "%s: this model folder records no tokenizer fingerprint (saved by an older vlm), so its tokenizer "
            "cannot be verified; re-save the model to record one",
            folder,
        )
        return
    found = tokenizer_fingerprint(tokenizer)
    if found != {k: record.get(k) for k in found}:
        files = ", ".join(record.get("files") or []) or "the tokenizer files"
        raise InputError(
            f"{folder}: the tokenizer files ({files}) give a tokenizer of {found['vocab_size']} tokens "
            f"(sha256 {found['sha256'][:12]}…), but the model was saved with {record.get('vocab_size')} tokens "
            f"(sha256 {str(record.get('sha256'))[:12]}…); restore the tokenizer files the model was saved with"
        )


# Files that hold a vocabulary; a folder with none of them loads as a tokenizer of special tokens only.
_VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def check_tokenizer_files(record: dict[str, Any] | None, folder: str | os.PathLike[str]) -> None:
    """Every tokenizer file written at save time must still be there (before transformers silently copes).

    A folder saved before the record existed must at least hold a vocabulary file.
    """
    folder = Path(folder)
    if record is None:
        if not any((folder / name).is_file() for name in _VOCABULARY_FILES):
            raise MissingInputError(
                f"{folder}: no tokenizer vocabulary file (one of {list(_VOCABULARY_FILES)}); transformers "
                "would build a tokenizer of its special tokens only. Copy the complete model folder"
            )
        return
    missing = [name for name in record.get("files") or [] if not (folder / name).is_file()]
    if missing:
        raise MissingInputError(
            f"{folder}: tokenizer file(s) {missing} missing; without them the model's tokenizer "
            f"({record.get('vocab_size')} tokens) cannot be rebuilt. Copy the complete model folder"
        )

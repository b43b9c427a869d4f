"""State dicts: loaded strictly with one clear error, and hashed by content.

Every model this package loads (slide encoder checkpoints, saved slide-text models) goes through
`load_state_strict`, so a checkpoint of another architecture is refused with the keys that do not fit rather
than torch's RuntimeError; `update_state_digest` hashes tensors, not files, so models built in a notebook
fingerprint the same as loaded ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vlm.errors import InputError


def _listed(keys: list[str], most: int = 5) -> str:
    more = f" (+{len(keys) - most} more)" if len(keys) > most else ""
    return f"{keys[:most]}{more}"


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, fix: str) -> None:
    """`model.load_state_dict(state, strict=True)`, after a check that names the missing, unexpected and
    wrongly shaped keys; raises ValueError `"<source> does not fit <model>: …; <fix>"`."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in sorted(expected.items())
        if key in state and tuple(state[key].shape) != tuple(value.shape)
    ]
    if missing or unexpected or wrong:
        details = ", ".join(
            f"{label} {_listed(keys)}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
            if keys
        )
        raise InputError(f"{source} does not fit the {type(model).__name__}: {details}; {fix}")
    model.load_state_dict(state, strict=True)


def update_state_digest(digest: Any, model: nn.Module, prefixes: tuple[str, ...]) -> Any:
    """Feed the names and raw bytes of `model`'s state-dict entries under `prefixes` (sorted) into a
    hashlib `digest`; returns it."""
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(prefixes):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest


def weights_digest(model: nn.Module) -> str:
    """sha256 over all of a module's state dict: which weights made an embedding (recorded with slide
    embeddings and carried into models trained on them, so a different checkpoint is refused, not used)."""
    import hashlib

    return update_state_digest(hashlib.sha256(), model, ("",)).hexdigest()

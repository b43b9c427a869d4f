"""The zero-shot classifier beside the model: prompt files -> class prototypes -> slide probabilities.

Prototype (CONCH/TITAN ensembling): embed every synonym × template, L2-normalise each, average, and
renormalise. Scoring (`zero_shot_probabilities`, the one scoring function): project + L2-normalise the
unprojected slide embeddings, cosine with each prototype, softmax with the model's logit scale. Shared by the
stages that score slides against prompts: `vlm zeroshot`, `vlm heatmap` and `vlm serve`.

Prompt embeddings are cached on disk, keyed by hashes of the exact expanded prompts, the model's text tower
(text weights, text projection, their config) and its tokenizer, and checksummed: a damaged or foreign
cache file is re-encoded with a warning, never trusted. A re-run of a task does no text encoding at all,
and editing a prompt or retraining the model misses the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vlm.errors import UsageError
from vlm.io import atomic_path, cache_folder
from vlm.model.clip import SlideTextModel
from vlm.prompts import DEFAULT_TEMPLATES, PromptTask, load_prompt_task, task_from_classes
from vlm.weights import update_state_digest

log = logging.getLogger(__name__)

CACHE_VERSION = 2
CACHE_FORMAT = "vlm-prompt-cache"


def default_cache_dir() -> Path:
    """`$VLM_CACHE/prompts` when VLM_CACHE is set, else `~/.cache/vlm/prompts`."""
    return cache_folder("prompts")


def text_fingerprint(model: SlideTextModel) -> str:
    """One hash of everything that decides a text embedding: text tower weights, text projection, their
    config, and the tokenizer (vocabulary and behaviour, `tokenizer_fingerprint`).

    Hashing the tensors (not a file) works for models built in a notebook as well as loaded ones, and a
    model whose slide side changed but whose text side did not keeps its cached prompts. It reads every text
    weight, so callers compute it once per model (`ZeroShotClassifier.text_fingerprint`).
    """
    from vlm.encoders.text import tokenizer_fingerprint

    config = model.config
    text_config = {
        "text_config": config.text_config,
        "max_length": config.max_length,
        "proj_dim": config.proj_dim,
        "text_proj": config.text_proj,
    }
    digest = hashlib.sha256()
    digest.update(f"{CACHE_FORMAT}-{CACHE_VERSION}\n{json.dumps(text_config, sort_keys=True)}\n".encode())
    digest.update(tokenizer_fingerprint(model.tokenizer)["sha256"].encode())
    return update_state_digest(digest, model, ("text.", "text_proj.")).hexdigest()


def _tensor_sha256(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _read_cache(path: Path, key: str, shape: tuple[int, int]) -> Tensor | None:
    """The cached embeddings when the file is intact and is this key's; None (with a warning) otherwise."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            embeddings = handle.get_tensor("embeddings")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        problem = f"unreadable ({error})"
    else:
        problem = None
        if metadata.get("format") != CACHE_FORMAT or metadata.get("key") != key:
            problem = "not a vlm prompt cache for these prompts and this text model (key differs)"
        elif embeddings.dtype != torch.float32 or tuple(embeddings.shape) != shape:
            problem = f"{embeddings.dtype} {tuple(embeddings.shape)} instead of float32 {shape}"
        elif metadata.get("sha256") != _tensor_sha256(embeddings):
            problem = "checksum mismatch"
        elif not bool(torch.isfinite(embeddings).all()):
            problem = "non-finite values"
    if problem is not None:
        log.warning("prompt cache %s is damaged or foreign (%s); re-encoding the prompts", path, problem)
        return None
    return embeddings


def embed_prompts(
    model: SlideTextModel,
    prompts: Sequence[str],
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    batch_size: int = 64,
    fingerprint: str | None = None,
) -> Tensor:
    """[N, proj_dim] L2-normalised embeddings of `prompts`, read from the cache when possible.

    The cache file is named by sha256(text fingerprint + prompts), records that key and the embeddings'
    sha256 in its metadata, and is written atomically, so two jobs sharing a cache folder never read a
    half-written file and a damaged or swapped file is re-encoded. Pass `fingerprint`
    (`text_fingerprint(model)`) when it is already known: computing it reads every text weight.
    """
    from safetensors.torch import save_file

    prompts = list(prompts)
    path: Path | None = None
    if use_cache:
        fingerprint = fingerprint or text_fingerprint(model)
        prompts_sha = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
        key = hashlib.sha256(f"{CACHE_FORMAT}-{CACHE_VERSION}:{fingerprint}:{prompts_sha}".encode()).hexdigest()
        path = Path(cache_dir or default_cache_dir()) / f"{key}.safetensors"
        if path.is_file():
            cached = _read_cache(path, key, (len(prompts), model.config.proj_dim))
            if cached is not None:
                log.info("prompt embeddings: cache hit %s (%d prompts, no text encoding)", path, len(prompts))
                return cached
    log.info("encoding %d prompts", len(prompts))
    embeddings = model.encode_text(prompts, batch_size=batch_size, device="cpu").float().contiguous()
    if path is not None:
        metadata = {
            "format": CACHE_FORMAT,
            "version": str(CACHE_VERSION),
            "key": key,
            "text_fingerprint": fingerprint,
            "prompts_sha256": prompts_sha,
            "n_prompts": str(len(prompts)),
            "sha256": _tensor_sha256(embeddings),
        }
        with atomic_path(path) as tmp:
            save_file({"embeddings": embeddings}, str(tmp), metadata=metadata)
        log.info("prompt embeddings cached in %s", path)
    return embeddings


def ensemble(embeddings: Tensor) -> Tensor:
    """One class prototype from its prompts' embeddings [P, D]: normalise each, mean, renormalise -> [D]."""
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise UsageError(f"a class prototype needs at least one prompt embedding [P, D], got {tuple(embeddings.shape)}")
    return F.normalize(F.normalize(embeddings.float(), dim=-1).mean(dim=0), dim=-1)


def zero_shot_probabilities(
    model: SlideTextModel,
    slide_embeddings: Tensor,
    prototypes: Tensor,
    ids: Sequence[str] | None = None,
    source: object = None,
) -> Tensor:
    """`zero_shot_logits(...).softmax(-1)`: class probabilities [N, C]."""
    return zero_shot_logits(model, slide_embeddings, prototypes, ids, source).softmax(dim=-1)


def zero_shot_logits(
    model: SlideTextModel,
    slide_embeddings: Tensor,
    prototypes: Tensor,
    ids: Sequence[str] | None = None,
    source: object = None,
) -> Tensor:
    """Unprojected slide embeddings [N, E] + class prototypes [C, D] -> class logits [N, C] (on the CPU).

    Probabilities are softmax(scale · cos(project(slide), prototype)) with the model's (clamped) learned
    logit scale; argmax, and so accuracy, does not depend on the scale, but probabilities and calibration
    do. A slide whose embedding, or its projection, is not finite is refused by id (`ids`, else its row
    number): argmax of NaN would otherwise print a confident-looking class. `source` (the slides file)
    prefixes that error.
    """
    slide_embeddings = torch.as_tensor(slide_embeddings, dtype=torch.float32)
    _refuse_non_finite(slide_embeddings, ids, "slide embedding", source)
    with torch.no_grad():
        slides = model.encode_slide_embeddings(slide_embeddings)
        _refuse_non_finite(slides, ids, "projected slide embedding (values too large for float32?)", source)
        return (model.scale().float() * slides @ prototypes.to(slides.device, torch.float32).T).cpu()  # [N, C]


def _refuse_non_finite(values: Tensor, ids: Sequence[str] | None, what: str, source: object = None) -> None:
    finite = torch.isfinite(values)
    if values.ndim > 1:
        finite = finite.flatten(1).all(dim=1)  # one flag per slide
    bad = torch.nonzero(~finite).flatten().tolist()
    if bad:
        names = [str(ids[i]) for i in bad] if ids is not None else [f"row {i}" for i in bad]
        where = f"{source}: " if source else ""
        raise UsageError(
            f"{where}{len(bad)} slide(s) have a non-finite (NaN or infinite) {what} and cannot be scored: "
            f"{names[:20]}{' …' if len(names) > 20 else ''}; re-embed or remove them"
        )


class ZeroShotClassifier:
    """Class prototypes of a prompt task for one model; `predict` gives probabilities per slide.

    Build with `from_prompt_file(model, "prompts/nsclc_subtyping.yaml")` or
    `from_classes(model, {"LUAD": ["lung adenocarcinoma"], "LUSC": [...]})`. A file with several prompt
    sets (MI-Zero) also gets one prototype matrix per set (`predict_per_set`).
    """

    def __init__(
        self,
        model: SlideTextModel,
        task: PromptTask,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
    ) -> None:
        self.model = model
        self.task = task
        flat: list[tuple[int, str, str]] = [
            (set_index, code, prompt)
            for set_index, prompt_set in enumerate(task.prompt_sets)
            for code, prompts in prompt_set.expand().items()
            for prompt in prompts
        ]
        # MI-Zero sets repeat prompts (and TITAN shares synonyms across classes): encode each text once.
        unique = list(dict.fromkeys(p for _, _, p in flat))
        row = {prompt: i for i, prompt in enumerate(unique)}
        encoded = embed_prompts(
            model,
            unique,
            cache_dir=cache_dir,
            use_cache=use_cache,
            fingerprint=self.text_fingerprint if use_cache else None,
        )
        embeddings = encoded[[row[p] for _, _, p in flat]]
        set_ids = np.array([s for s, _, _ in flat])
        codes = np.array([c for _, c, _ in flat])
        self.prototypes = torch.stack([ensemble(embeddings[codes == code]) for code in task.classes])  # [C, D]
        self.set_prototypes = (
            [
                torch.stack([ensemble(embeddings[(set_ids == s) & (codes == code)]) for code in task.classes])
                for s in range(len(task.prompt_sets))
            ]
            if len(task.prompt_sets) > 1
            else []
        )

    @classmethod
    def from_prompt_file(cls, model: SlideTextModel, path: str | os.PathLike[str], **cache: Any) -> ZeroShotClassifier:
        return cls(model, load_prompt_task(path), **cache)

    @classmethod
    def from_classes(
        cls,
        model: SlideTextModel,
        classes: Mapping[str, Sequence[str]] | Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        positive: str | None = None,
        **cache: Any,
    ) -> ZeroShotClassifier:
        return cls(model, task_from_classes(classes, templates=templates, positive=positive), **cache)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.task.classes

    @functools.cached_property
    def text_fingerprint(self) -> str:
        """`text_fingerprint(model)`, computed once (it reads every text weight) for the cache and run.json."""
        return text_fingerprint(self.model)

    def prompts_used(self) -> dict[str, Any]:
        """The exact prompts behind each prototype (written to prompts_used.json beside predictions)."""
        out: dict[str, Any] = {
            "task": self.task.name,
            "source": self.task.source,
            "format": self.task.format,
            "classes": list(self.task.classes),
            "positive": self.task.positive,
            "prompts": self.task.expand(),
        }
        if len(self.task.prompt_sets) > 1:
            out["prompt_sets"] = [prompt_set.expand() for prompt_set in self.task.prompt_sets]
        return out

    def predict(
        self,
        slide_embeddings: Tensor | np.ndarray,
        ids: Sequence[str] | None = None,
        source: object = None,
        logits: bool = False,
    ) -> np.ndarray:
        """Unprojected slide embeddings [N, E] -> probabilities [N, C] (columns in `classes` order); with
        `logits`, the logits whose softmax they are.

        For an MI-Zero file these are the pooled ensemble's (all prompts of all sets in one prototype).
        Non-finite slides are refused, named by `ids` (else row numbers) and `source`.
        """
        score = zero_shot_logits if logits else zero_shot_probabilities
        return score(self.model, torch.as_tensor(slide_embeddings), self.prototypes, ids, source).numpy()

    def predict_per_set(
        self, slide_embeddings: Tensor | np.ndarray, ids: Sequence[str] | None = None, logits: bool = False
    ) -> list[np.ndarray]:
        """Probabilities (or `logits`) [N, C] from each prompt set on its own (MI-Zero); empty for a single set."""
        x = torch.as_tensor(slide_embeddings)
        score = zero_shot_logits if logits else zero_shot_probabilities
        return [score(self.model, x, p, ids).numpy() for p in self.set_prototypes]

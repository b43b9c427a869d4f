"""Slide–report alignment training: one function, `train(TrainConfig)`, used by `vlm train` and notebooks.

A run folder holds everything needed to use or continue it:
- `train_config.json`  the resolved `TrainConfig` (a resumed run reads it back);
- `splits.csv`         slide_id, patient_id, split of every pair (evaluate on `test`, never tune on it);
- `metrics.jsonl`      one JSON object per step (`train/loss`, `lr`, …) and per epoch (`val/…`);
- `model/`             the best model by validation mean recall (the last one without a validation split);
- `last/`              the model after the latest epoch;
- `checkpoints/last.pt` model, optimizer, scheduler, AMP scaler, RNG states and data position, so that a
  resumed run continues with the same batches and random numbers as an uninterrupted one.

Under `torchrun` every rank takes its slice of each global batch; open_clip's loss gathers the features of
all ranks (with gradient) and gradients are averaged across ranks as DDP would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from vlm.device import autocast, autocast_dtype, resolve_device
from vlm.encoders.text import DEFAULT_MAX_LENGTH, DEFAULT_TEXT_ENCODER
from vlm.formats.embeddings import load_slide_embeddings, read_embedding_settings
from vlm.formats.pairs import SPLITS, Pairs, check_slides_available, load_pairs
from vlm.io import atomic_path, load_torch_file, recover_dir
from vlm.metrics import retrieval_recalls
from vlm.model.clip import CLIP_INIT_LOGIT_SCALE, SlideTextModel, create_model
from vlm.model.loss import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, contrastive_loss, create_loss
from vlm.train import data as pairs_data
from vlm.train.gradcache import chunks_of, contrastive_backward

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"
CHECKPOINT = Path("checkpoints") / "last.pt"


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as `train_config.json` in the run folder."""

    pairs: str
    out: str
    slide_embeddings: str | None = None  # frozen slide tower: `vlm embed-slides` parquet
    features: str | None = None  # full fine-tuning: folder of `<slide_id>.h5` tile features
    slide_encoder: str = "gigapath"  # preset used with `features`
    mpp: float | None = None  # with `features`: level-0 µm/px overriding the files' (CLAM files need it)
    patches: str | None = None  # with `features`: CLAM `patches/` folder holding the tile geometry
    slide_checkpoint: str | None = None
    pool: str = "mean"
    max_tiles: int | None = None  # subsample longer slides in training (None = all tiles)
    text_encoder: str = DEFAULT_TEXT_ENCODER
    max_length: int = DEFAULT_MAX_LENGTH
    proj_dim: int = 512
    loss: str = "clip"
    epochs: int = 10
    batch_size: int = 64  # pairs per contrastive batch and optimizer step
    chunk_size: int | None = None  # GradCache chunk (pairs embedded with a graph at once); None = batch
    lr: float = 1e-4
    weight_decay: float = 0.2
    warmup_steps: int | None = None  # None = 5% of all steps
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    freeze_slide: bool = False
    freeze_text: bool = False
    unfreeze_text_last: int = 0  # with freeze_text semantics: train only the last N text layers
    grad_checkpointing: bool = False
    val_fraction: float = 0.1  # used only when the pairs have no split column
    test_fraction: float = 0.0
    drop_missing: bool = False
    checkpoint_every: int = 0  # also checkpoint every N steps (0 = at epoch ends only)
    eval_batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if (self.slide_embeddings is None) == (self.features is None):
            raise ValueError("give exactly one slide input: --slide-embeddings (frozen) or --features (fine-tuning)")
        for name in ("epochs", "batch_size", "eval_batch_size", "proj_dim", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.unfreeze_text_last < 0:
            raise ValueError("--unfreeze-text-last must be >= 0")

    @property
    def frozen(self) -> bool:
        return self.slide_embeddings is not None

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; --resume needs a run folder written by `vlm train`")
        values = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; was it written by a newer vlm?")
        return cls(**values)


@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Distributed:
    """Join the torchrun process group (gloo on CPU, NCCL on GPU) when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return _Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Distributed(dist.get_rank(), dist.get_world_size())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, lists and numbers: what `torch.load(weights_only=True)` accepts, no pickle."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """`checkpoints/last.pt` read with `weights_only=True`: tensors and plain values only, never code.

    A checkpoint holding any other pickled object (crafted, or written by a vlm that stored RNG states as
    numpy objects) is refused rather than unpickled, since unpickling can run arbitrary code.
    """
    state = load_torch_file(path, "vlm training checkpoint", fix="restart the run without --resume")
    if not isinstance(state, dict) or not {"model", "optimizer", "rng", "global_step"} <= set(state):
        raise ValueError(f"{path}: not a vlm training checkpoint (keys model, optimizer, rng, ... missing)")
    return state


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: weight decay only on weight matrices.

    Excluded from decay (as open_clip and BERT recipes do): biases, norm weights, other 1-d parameters,
    the logit scale/bias, token and position embeddings and the CLS token — decaying them pulls
    temperatures and normalisers towards zero for no regularising benefit.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lowered = name.lower()
        exclude = param.ndim < 2 or "norm" in lowered or "logit_" in name or "embeddings" in name or "cls_token" in name
        (no_decay if exclude or "bias" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, extend_from: tuple[int, float] | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over `warmup` steps, then cosine decay to 0 at `total` steps.

    `extend_from=(step, factor)`: a run resumed with more epochs than it was planned with stood at `factor`
    (0 at the end of a finished run) at `step`. From there the factor ramps linearly over `warmup` steps to the
    cosine of the longer plan, then follows it to 0 at the new `total`: no step at 0, no jump.
    """

    def planned(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))

    def factor(step: int) -> float:
        if extend_from is not None and extend_from[0] <= step < extend_from[0] + warmup:
            start, start_factor = extend_from
            target = planned(start + warmup)
            return start_factor + (target - start_factor) * (step - start + 1) / warmup
        return planned(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _apply_freezing(model: SlideTextModel, config: TrainConfig) -> None:
    if config.freeze_text or config.unfreeze_text_last:
        model.text.freeze(unfreeze_last=config.unfreeze_text_last)
    if config.freeze_slide and model.slide_encoder is not None:
        model.slide_encoder.requires_grad_(False)
    if config.grad_checkpointing:
        model.text.set_grad_checkpointing(True)
        if model.slide_encoder is not None:
            model.slide_encoder.set_grad_checkpointing(True)


class _Inputs:
    """Slide inputs of the pairs (cached embeddings or feature files) and their reports, by row."""

    def __init__(self, config: TrainConfig, pairs: Pairs, device: torch.device) -> None:
        self.config, self.pairs, self.device = config, pairs, device
        self.embeddings: Tensor | None = None
        self._text_features: Tensor | None = None
        if config.slide_embeddings is not None:
            table = load_slide_embeddings(config.slide_embeddings)
            self.embeddings = table.lookup(pairs.slide_ids).to(device)  # [N_pairs, D]
            self.slide_dim = table.dim
            used = pairs.indices("train") + pairs.indices("val")  # test rows are never read by training
            table.check_finite([pairs.slide_ids[i] for i in used])
            log.info(
                "slide embeddings: %d slides, %d-d, encoder=%s pool=%s",
                len(table.ids),
                table.dim,
                table.encoder,
                table.pool,
            )
        self.tokens: pairs_data.ReportTokens | None = None  # set by `tokenize` once the text tower is known
        self.features = Path(config.features) if config.features is not None else None
        self.loader = (
            pairs_data.PrefetchingFeatureLoader(self.features, config.mpp, config.patches)
            if self.features is not None
            else None
        )

    def encode_slides(self, model: SlideTextModel, rows: Sequence[int], seed: int = 0) -> Tensor:
        if self.embeddings is not None:
            return model.encode_slide_embeddings(self.embeddings[list(rows)])
        assert self.loader is not None
        max_tiles = self.config.max_tiles if model.training else None
        feats, coords, mask = self.loader.load([self.pairs.slide_ids[i] for i in rows], max_tiles, seed)
        return model.encode_slides(feats.to(self.device), coords.to(self.device), mask.to(self.device))

    def plan_slides(self, chunks: list[list[int]], training: bool, seed: int = 0) -> None:
        """Tell the feature loader which row chunks `encode_slides` gets next, so it can read ahead."""
        if self.loader is not None:
            max_tiles = self.config.max_tiles if training else None
            self.loader.plan([([self.pairs.slide_ids[i] for i in c], max_tiles, seed) for c in chunks])

    def tokenize(self, model: SlideTextModel) -> None:
        """Tokenise every report once (`datasets` on-disk cache: re-runs and resumed runs read it back)."""
        self.tokens = pairs_data.ReportTokens(self.pairs.reports, model.text.tokenizer, model.text.max_length)

    def _tokens(self, model: SlideTextModel, rows: Sequence[int]) -> dict[str, Tensor]:
        if self.tokens is not None:
            return self.tokens.batch(rows, self.device)
        return model.text.tokenize([self.pairs.reports[i] for i in rows], device=self.device)

    def encode_texts(self, model: SlideTextModel, rows: Sequence[int]) -> Tensor:
        if not any(p.requires_grad for p in model.text.parameters()):
            return F.normalize(model.text_proj(self._frozen_text_features(model)[list(rows)]), dim=-1)
        return model.encode_tokens(self._tokens(model, rows))

    def _frozen_text_features(self, model: SlideTextModel) -> Tensor:
        """A fully frozen text tower is a fixed function: run it once per report (eval mode) and reuse it.

        This turns `--freeze-text` training from one text-tower pass per step into one pass per run.
        """
        if self._text_features is None:
            was_training = model.text.training
            model.text.eval()
            n = len(self.pairs.reports)
            with torch.no_grad():
                self._text_features = torch.cat([
                    model.text(**self._tokens(model, range(i, min(i + 64, n)))).float() for i in range(0, n, 64)
                ])  # [N_pairs, text width]
            model.text.train(was_training)
        return self._text_features


def _prepare_pairs(config: TrainConfig) -> Pairs:
    pairs = load_pairs(config.pairs)
    pairs = pairs_data.assign_splits(pairs, config.val_fraction, config.test_fraction, config.seed)
    if config.slide_embeddings is not None:
        ids = set(load_slide_embeddings(config.slide_embeddings).ids)
        source = config.slide_embeddings
    else:
        ids = pairs_data.feature_slide_ids(config.features or "")
        source = str(config.features)
    pairs = check_slides_available(pairs, ids, source, drop_missing=config.drop_missing)
    if config.features is not None:
        pairs = pairs_data.check_feature_files(
            pairs, Path(config.features), config.drop_missing, mpp=config.mpp, patches=config.patches
        )
    counts = {s: len(pairs.indices(s)) for s in SPLITS}
    log.info("pairs: %s (test pairs are never trained on)", ", ".join(f"{n} {s}" for s, n in counts.items()))
    if counts["train"] < 2:
        raise ValueError(f"{config.pairs}: {counts['train']} training pair(s); contrastive training needs at least 2")
    return pairs


def _write_splits(path: Path, pairs: Pairs) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "slide_id": pairs.slide_ids,
            "patient_id": pairs.patient_ids or pairs.slide_ids,
            "split": pairs.splits,
        }
    )
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _build_model(config: TrainConfig, slide_dim: int | None, resume_dir: Path | None) -> SlideTextModel:
    if resume_dir is not None:  # architecture from the run's last saved model; weights from the checkpoint
        return SlideTextModel.from_pretrained(resume_dir / "last")
    siglip = config.loss == "siglip"
    model = create_model(
        text_encoder=config.text_encoder,
        slide_embed_dim=slide_dim,
        slide_encoder=None if config.frozen else config.slide_encoder,
        slide_checkpoint=config.slide_checkpoint,
        proj_dim=config.proj_dim,
        max_length=config.max_length,
        pool=config.pool,
        init_logit_scale=SIGLIP_INIT_LOGIT_SCALE if siglip else CLIP_INIT_LOGIT_SCALE,
        init_logit_bias=SIGLIP_INIT_LOGIT_BIAS if siglip else None,
    )
    if config.frozen:  # which slide encoder made the embeddings: tile heatmaps rebuild it from this
        model.config.slide_source = read_embedding_settings(config.slide_embeddings) or None
    return model


class _MetricsLog:
    """Append-only `metrics.jsonl`; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and path.exists():
            kept = [line for line in self._records(path) if json.loads(line)["step"] <= keep_until_step]
            with atomic_path(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
        elif enabled and keep_until_step is None:
            path.unlink(missing_ok=True)

    @staticmethod
    def _records(path: Path) -> list[str]:
        """The file's JSON lines; a final line cut short by a kill is dropped with a warning, any other bad
        line is an error naming it (the log was edited or damaged, not interrupted)."""
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("no integer 'step'")
            except ValueError as error:
                if number == len(lines):
                    log.warning("%s: dropping an unfinished last line (%s) left by an interrupted run", path, error)
                    return lines[:-1]
                raise ValueError(f"{path}: line {number} is not a metrics record ({error}); fix or remove it") from None
        return lines

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


@torch.no_grad()
def evaluate(
    model: SlideTextModel, inputs: _Inputs, rows: list[int], loss_fn: nn.Module, config: TrainConfig
) -> dict[str, float]:
    """Validation loss and report→slide / slide→report Recall@1/5/10 over `rows` (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    try:
        # slides of thousands of tiles are encoded a few at a time; cached embeddings and texts in larger batches
        slide_batch = config.eval_batch_size if config.frozen else (config.chunk_size or 4)
        slide_chunks = [rows[i : i + slide_batch] for i in range(0, len(rows), slide_batch)]
        chunks = [rows[i : i + config.eval_batch_size] for i in range(0, len(rows), config.eval_batch_size)]
        device = inputs.device
        inputs.plan_slides(slide_chunks, training=False)
        with autocast(device, config.precision):
            slides = torch.cat([inputs.encode_slides(model, c) for c in slide_chunks])
            texts = torch.cat([inputs.encode_texts(model, c) for c in chunks])
        loss = contrastive_loss(loss_fn, slides, texts, model.scale(), model.logit_bias)
    finally:
        model.train(was_training)
    metrics = {f"val/{k}": v for k, v in retrieval_recalls(slides, texts).items()}
    metrics["val/loss"] = float(loss)
    return metrics


def _remove_unfinished(out: Path) -> None:
    """Delete the `.*.part` files an interrupted run left in its folder (a checkpoint is ~0.2 GB).

    `atomic_path` writes under those names and renames only when complete, so a `.part` is never a finished
    output; the run about to start owns the folder. Folder outputs (`model/`, ...) stage inside themselves:
    `recover_dir` finishes a committed write there and removes what a kill left before the commit.
    """
    for folder in (p for p in out.iterdir() if p.is_dir()) if out.is_dir() else ():
        recover_dir(folder)
    parts = [p for folder in (out, out / CHECKPOINT.parent) if folder.is_dir() for p in folder.glob(".*.part")]
    parts = [p for p in parts if p.is_file()]
    size = sum(p.stat().st_size for p in parts)
    for part in parts:
        part.unlink(missing_ok=True)
    if parts:
        log.warning("%s: removed %d unfinished file(s) (%.1f MB) left by a killed run", out, len(parts), size / 1e6)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train(config: TrainConfig, resume: bool = False, progress: bool = False) -> Path:
    """Train (or with `resume`, continue) an alignment run in `config.out`; return the `model/` folder."""
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT
    if resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"{checkpoint_path}: no checkpoint to resume from; start the run without --resume")
    if not resume and checkpoint_path.exists():
        raise ValueError(
            f"{out} already holds a training run; pass --resume {out} to continue it or pick another --out"
        )
    device = resolve_device(config.device)
    dist_ = _init_distributed(device)
    if device.type == "cuda" and dist_.world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist_.main:
        _remove_unfinished(out)
    _seed_everything(config.seed)

    pairs = _prepare_pairs(config)
    inputs = _Inputs(config, pairs, device)
    train_rows, val_rows = pairs.indices("train"), pairs.indices("val")
    model = _build_model(config, getattr(inputs, "slide_dim", None), out if resume else None).to(device)
    _apply_freezing(model, config)
    inputs.tokenize(model)
    assert inputs.tokens is not None
    truncated = inputs.tokens.count_truncated(train_rows + val_rows)
    if truncated:
        log.warning(
            "%d of %d reports exceed %d tokens and are truncated",
            truncated,
            len(train_rows) + len(val_rows),
            config.max_length,
        )

    batch_size = min(config.batch_size, len(train_rows))
    if batch_size % dist_.world_size:
        raise ValueError(
            f"batch size {batch_size} must divide by the {dist_.world_size} processes (equal shares per rank)"
        )
    if batch_size < config.batch_size:
        log.warning("only %d training pairs: batch size lowered from %d", batch_size, config.batch_size)
    steps_per_epoch = len(train_rows) // batch_size  # the remainder is dropped; each epoch reshuffles
    total_steps = steps_per_epoch * config.epochs
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, round(0.05 * total_steps))
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = cosine_with_warmup(optimizer, warmup, total_steps)
    amp_dtype = autocast_dtype(device, config.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = create_loss(config.loss, dist_.rank, dist_.world_size)

    epoch, step_in_epoch, global_step, best = 0, 0, 0, -math.inf
    extend_from: tuple[int, float] | None = None  # where a run extended by `--resume --epochs` left its plan
    if resume:
        state = _load_checkpoint(checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        extend_from = state.get("lr_extend_from")
        planned_epochs = int(state.get("config", {}).get("epochs", config.epochs))
        if planned_epochs != config.epochs:  # `--resume --epochs N`: continue the schedule smoothly
            extend_from = (int(state["global_step"]), scheduler.get_last_lr()[0] / config.lr)
            log.info("extending the run from %d to %d epochs: the learning rate ramps from %.3g over %d steps, "
                     "then follows the cosine of the longer run", planned_epochs, config.epochs,
                     scheduler.get_last_lr()[0], warmup)  # fmt: skip
        if extend_from is not None:
            scheduler = cosine_with_warmup(optimizer, warmup, total_steps, extend_from=tuple(extend_from))
            scheduler.load_state_dict(state["scheduler"])
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        epoch, step_in_epoch, global_step, best = (
            state["epoch"],
            state["step_in_epoch"],
            state["global_step"],
            state["best"],
        )
        log.info("resumed %s at epoch %d, step %d", out, epoch, global_step)
    elif dist_.main:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / CONFIG_FILE)
        _write_splits(out / "splits.csv", pairs)
    metrics = _MetricsLog(out / "metrics.jsonl", dist_.main, global_step if resume else None)
    if not resume:
        counts = {f"pairs/{split}": len(pairs.indices(split)) for split in SPLITS}
        metrics.write({"step": 0, **counts, "truncated_reports": truncated, "max_length": config.max_length})
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info(
        "training %d pairs, %d steps/epoch × %d epochs, batch %d, %s trainable parameters on %s",
        len(train_rows),
        steps_per_epoch,
        config.epochs,
        batch_size,
        f"{sum(p.numel() for p in trainable):,}",
        device,
    )

    def checkpoint(next_epoch: int, next_step: int) -> None:
        if dist_.main:
            _save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": _rng_state(), "epoch": next_epoch, "step_in_epoch": next_step,
                "global_step": global_step, "best": best, "config": dataclasses.asdict(config),
                "lr_extend_from": extend_from,
            })  # fmt: skip

    if not resume and dist_.main:
        model.save_pretrained(out / "last")  # the architecture a resumed run rebuilds
    while epoch < config.epochs:
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        model.train()
        steps = range(step_in_epoch, steps_per_epoch)
        for step in tqdm(steps, desc=f"epoch {epoch}", unit="step", disable=not (progress and dist_.main)):
            batch = [train_rows[i] for i in order[step * batch_size : (step + 1) * batch_size].tolist()]
            mine = batch[dist_.rank :: dist_.world_size]
            lr = scheduler.get_last_lr()[0]
            tile_seed = config.seed * 1_000_003 + global_step
            started = time.perf_counter()
            try:
                loss = _train_step(model, inputs, mine, loss_fn, optimizer, scaler, config, device, tile_seed, dist_)
            except FloatingPointError as error:
                raise FloatingPointError(
                    f"{out}: epoch {epoch}, step {global_step + 1}: {error}. Training stopped; nothing of this "
                    f"step was saved (`model/`, `last/` and the checkpoint hold step {global_step} or earlier)"
                ) from None
            loss["step_seconds"] = round(time.perf_counter() - started, 4)
            scheduler.step()
            global_step += 1
            metrics.write({"step": global_step, "epoch": epoch, **loss, "lr": lr})
            if config.checkpoint_every and global_step % config.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                checkpoint(epoch, step + 1)
        step_in_epoch = 0
        record: dict[str, Any] = {"step": global_step, "epoch": epoch}
        if val_rows:
            record.update(evaluate(model, inputs, val_rows, create_loss(config.loss), config))
            if not math.isfinite(record["val/loss"]):
                raise FloatingPointError(
                    f"{out}: epoch {epoch}: non-finite validation loss ({record['val/loss']}); training stopped and "
                    "this epoch's model was not saved"
                )
            log.info(
                "epoch %d: %s",
                epoch,
                ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k.startswith("val/")),
            )
        metrics.write(record)
        epoch += 1
        if dist_.main:
            model.save_pretrained(out / "last")
            score = record.get("val/mean_recall", -math.inf)
            if not val_rows or score > best:
                best = score if val_rows else best
                model.save_pretrained(out / "model")
        checkpoint(epoch, 0)
    if dist_.world_size > 1:
        torch.distributed.barrier()
    return out / "model"


def _train_step(
    model: SlideTextModel,
    inputs: _Inputs,
    rows: list[int],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    device: torch.device,
    tile_seed: int,
    dist_: _Distributed,
) -> dict[str, float]:
    """One optimizer step on this rank's rows of the batch (GradCache when `chunk_size` < rows)."""
    optimizer.zero_grad(set_to_none=True)

    def encode_slides(positions: Sequence[int]) -> Tensor:
        with autocast(device, config.precision):
            return inputs.encode_slides(model, [rows[i] for i in positions], tile_seed)

    def encode_texts(positions: Sequence[int]) -> Tensor:
        with autocast(device, config.precision):
            return inputs.encode_texts(model, [rows[i] for i in positions])

    def loss_of(slides: Tensor, texts: Tensor) -> Tensor:
        return contrastive_loss(loss_fn, slides.float(), texts.float(), model.scale(), model.logit_bias)

    chunk = config.chunk_size if config.chunk_size is not None else (None if config.frozen else 4)
    cached = chunk is not None and chunk < len(rows)
    parts = [[rows[i] for i in part] for part in chunks_of(len(rows), chunk if cached else len(rows))]
    inputs.plan_slides(parts * 2 if cached else parts, training=True, seed=tile_seed)  # GradCache reads twice
    loss = contrastive_backward(encode_slides, encode_texts, len(rows), loss_of, chunk, scaler.scale)
    if dist_.world_size > 1:
        _average_gradients(model, dist_.world_size)
        torch.distributed.all_reduce(loss)
        loss = loss / dist_.world_size
    if not torch.isfinite(loss):  # before the optimizer step: the weights stay those of the last finite step
        ids = [inputs.pairs.slide_ids[i] for i in rows]
        raise FloatingPointError(f"non-finite training loss ({float(loss)}) on a batch of slides {ids[:10]}")
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf)
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        model.logit_scale.clamp_(0, model.config.max_logit_scale)
    return {"train/loss": float(loss), "grad_norm": float(grad_norm), "logit_scale": float(model.scale().detach())}


def _average_gradients(model: nn.Module, world_size: int) -> None:
    """Mean of every gradient across ranks: what DDP does, done by hand so GradCache's passes need no hooks."""
    import torch.distributed as dist

    for param in model.parameters():
        if param.requires_grad:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad /= world_size

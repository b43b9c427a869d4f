"""Slide–report alignment training: one function, `train(TrainConfig)`, used by `vlm train` and notebooks.

A run folder holds everything needed to use or continue it:
- `train_config.json`  the resolved `TrainConfig` (a resumed run reads it back);
- `splits.csv`         slide_id, patient_id, split of every pair (evaluate on `test`, never tune on it);
- `metrics.jsonl`      counts and metric definitions (`METRIC_DEFINITIONS`) first, then one JSON object per step
                       (`train/loss`, `lr`, …) and per epoch (`val/…`, recall counted by case);
- `model/`             the best model by validation mean recall (the last one without a validation split);
- `last/`              the model after the latest epoch;
- `checkpoints/last.pt` model, optimizer, scheduler, AMP scaler, RNG states and data position (`checkpoint`).

The package splits by concern, as open_clip's training code does: `config` (the settings), `inputs` (pairs,
splits, slide and report inputs), `batches` (one slide per case in a batch), `schedule` (AdamW groups, learning
rate), `checkpoint` (run-folder state),
`distributed` (torchrun ranks), `gradcache`; this module builds the model and runs the loop, as named steps:
`_check_run_folder` (resume rules, before anything is read), `_plan_batches`, `_build` and `_set_up` (model,
optimisation state, restored on resume), `_open_run_folder`, `_train_epochs` (steps, `_validate`, and
`_save_epoch`, the one place an epoch reaches disk) and `_result`, the `TrainResult` that `train` returns.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vlm.device import autocast, autocast_dtype, resolve_device
from vlm.errors import InputError, MissingInputError, NonFiniteError, UsageError
from vlm.formats.embeddings import load_slide_embeddings, read_embedding_settings
from vlm.formats.pairs import SPLITS, Pairs
from vlm.io import claim_output_folder, make_output_folder
from vlm.metrics import retrieval_recalls
from vlm.model.clip import CLIP_INIT_LOGIT_SCALE, SlideTextModel, create_model
from vlm.model.loss import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, contrastive_loss, create_loss
from vlm.training.batches import case_batches, case_steps
from vlm.training.checkpoint import (
    CHECKPOINT,
    MetricsLog,
    load_checkpoint,
    remove_unfinished,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from vlm.training.config import CONFIG_FILE, TrainConfig
from vlm.training.distributed import Distributed, average_gradients, init_distributed
from vlm.training.gradcache import chunks_of, contrastive_backward
from vlm.training.pair_inputs import Inputs, prepare_pairs, write_splits
from vlm.training.schedule import cosine_with_warmup, param_groups, resume_schedule

log = logging.getLogger(__name__)

# What each logged number means: written in the first line of every run's metrics.jsonl (and the docs).
METRIC_DEFINITIONS = {
    "case": "pairs rows sharing a patient_id, a report text or a slide_id are one case (transitively)",
    "train/loss": "open_clip contrastive loss (--loss) of one training batch; a batch holds at most one slide of "
    "a case, so a case's report is never its own negative",
    "val/report_to_slide/R@K": "fraction of validation pairs whose report ranks a slide of its own case among "
    "the K most similar validation slides (slides of other cases scoring equal count above it)",
    "val/slide_to_report/R@K": "fraction of validation pairs whose slide ranks a report row of its own case "
    "among the K most similar validation reports (ties count against it)",
    "val/mean_recall": "mean of the val R@K above over both directions and K; picks the best model/",
    "val/loss": "contrastive loss of the first validation pair of each case, as one batch (not comparable with "
    "train/loss)",
}


def build_model(config: TrainConfig, slide_dim: int | None, resume_dir: Path | None) -> SlideTextModel:
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
        model.config.slide_source = read_embedding_settings(config.embeddings) or None
    return model


def apply_freezing(model: SlideTextModel, config: TrainConfig) -> None:
    if config.freeze_text or config.unfreeze_text_last:
        model.text.freeze(unfreeze_last=config.unfreeze_text_last)
    if config.freeze_slide and model.slide_encoder is not None:
        model.slide_encoder.requires_grad_(False)
    if config.grad_checkpointing:
        model.text.set_grad_checkpointing(True)
        if model.slide_encoder is not None:
            model.slide_encoder.set_grad_checkpointing(True)


@torch.no_grad()
def evaluate(
    model: SlideTextModel,
    inputs: Inputs,
    rows: list[int],
    loss_fn: nn.Module,
    config: TrainConfig,
    case_of: Sequence[int] | None = None,
) -> dict[str, float]:
    """Validation loss and report→slide / slide→report Recall@1/5/10 over `rows` (eval mode, no grad).

    With `case_of` (each pair row's case, `Pairs.cases`), any slide of a report's case is a hit and the
    loss is over the first row of each case, so a case's slides are not each other's negatives there either.
    """
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
        cases = [case_of[i] for i in rows] if case_of is not None else None
        first = sorted({c: i for i, c in reversed(list(enumerate(cases)))}.values()) if cases else None
        one_per_case = first if first is not None and len(first) < len(rows) else slice(None)
        loss = contrastive_loss(
            loss_fn, slides[one_per_case], texts[one_per_case], model.scale(), model.logit_bias
        )
    finally:
        model.train(was_training)
    metrics = {f"val/{k}": v for k, v in retrieval_recalls(slides, texts, cases=cases).items()}
    metrics["val/loss"] = float(loss)
    return metrics


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped `train`; the message names the last checkpoint and the command that resumes it."""


def _interrupted(out: Path) -> TrainingInterrupted:
    checkpoint = out / CHECKPOINT  # a new run refuses a folder holding one: this file is this run's
    if not checkpoint.is_file():
        return TrainingInterrupted(
            f"interrupted before the first checkpoint: {out} holds nothing to resume; run the same command again"
        )
    return TrainingInterrupted(
        f"interrupted: the last checkpoint is {checkpoint}; continue with: vlm train --resume {shlex.quote(str(out))}"
    )


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` made, so that a notebook has the outcome without reading `metrics.jsonl`.

    `os.fspath(result)` and `str(result)` are `model_dir`: code that used the `Path` `train` returned
    (`SlideTextModel.from_pretrained(train(config))`, `Path(train(config))`) keeps working.
    """

    model_dir: Path  # <out>/model: the best model by val/mean_recall (the last one without a validation split)
    best_epoch: int | None  # the epoch `model_dir` holds; None if metrics.jsonl no longer records it
    metrics: dict[str, Any]  # the last epoch's record in metrics.jsonl ("step", "epoch", with validation "val/…")

    def __fspath__(self) -> str:
        return os.fspath(self.model_dir)

    def __str__(self) -> str:
        return str(self.model_dir)


def train(config: TrainConfig, resume: bool = False, progress: bool = False) -> TrainResult:
    """Train (or with `resume`, continue) an alignment run in `config.out`; return its `TrainResult`.

    A new run claims its folder first (`claim_output_folder`): a folder of the user's files is refused
    before any work, and one that a failed start left empty is not left behind. Ctrl-C raises
    `TrainingInterrupted`, whose message says where the last checkpoint is and how to resume.
    """
    try:
        if resume:
            return _train(config, resume, progress)
        main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes
        with claim_output_folder(config.out, "train", write=main):
            return _train(config, resume, progress)
    except KeyboardInterrupt:
        raise _interrupted(Path(config.out)) from None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Which rows train and validate, and how they form batches: fixed before any model is built."""

    case_of: list[int]  # each pairs row's case (`Pairs.cases`): a case's slides are never each other's negatives
    train_rows: list[int]
    val_rows: list[int]
    by_case: bool  # False when every row is its own case: plain shuffled batches
    batch_size: int
    steps_per_epoch: int

    @property
    def train_cases(self) -> list[int]:
        return [self.case_of[i] for i in self.train_rows]


@dataclasses.dataclass
class _Run:
    """A run's parts and where it stands: what `_save_checkpoint` writes and a resumed run restores."""

    config: TrainConfig
    out: Path
    dist: Distributed
    device: torch.device
    inputs: Inputs
    plan: _Plan
    model: SlideTextModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    epoch: int = 0  # the next epoch to run
    step_in_epoch: int = 0  # the next step of it
    global_step: int = 0  # steps done
    best: float = -math.inf  # val/mean_recall of `model/`
    extend_from: tuple[int, float] | None = None  # where a run extended by `--resume --epochs` left its plan


def _train(config: TrainConfig, resume: bool, progress: bool) -> TrainResult:
    """The job in order: cheap checks, data and batch plan, model, optimisation state, folder, epochs, result."""
    out = Path(config.out)
    _check_run_folder(config, out, resume)
    device = resolve_device(config.device)
    dist_, device = init_distributed(device)
    if dist_.main:
        remove_unfinished(out)
    seed_everything(config.seed)

    table = load_slide_embeddings(config.embeddings) if config.embeddings is not None else None
    pairs = prepare_pairs(config, table)  # the parquet is read once, for the checks and the inputs
    inputs = Inputs(config, pairs, device, table)
    plan = _plan_batches(config, pairs, dist_.world_size)
    model, truncated = _build(config, inputs, plan, out if resume else None, device)
    run = _set_up(config, out, dist_, device, inputs, plan, model, resume)
    metrics = _open_run_folder(run, pairs, truncated, resume)
    _train_epochs(run, metrics, progress)
    if dist_.world_size > 1:
        torch.distributed.barrier()
    return _result(run, metrics)


def _check_run_folder(config: TrainConfig, out: Path, resume: bool) -> None:
    """The resume rules, before anything is read or built: resume needs a checkpoint and the run's settings
    unchanged but for the resumable ones; a new run never writes over a folder holding a run."""
    checkpoint_path = out / CHECKPOINT
    if resume and not checkpoint_path.is_file():
        raise MissingInputError(f"{checkpoint_path}: no checkpoint to resume from; start the run without `resume`")
    if resume:  # the run's saved settings, with no change but the resumable ones
        changes = {name: value for name, value in dataclasses.asdict(config).items() if name != "out"}
        TrainConfig.load(out / CONFIG_FILE).resumed(out, changes, out / CONFIG_FILE)
    if not resume and checkpoint_path.exists():
        raise InputError(
            f"{out} already holds a training run; pass `resume` {out} to continue it or pick another `out`"
        )


def _plan_batches(config: TrainConfig, pairs: Pairs, world_size: int) -> _Plan:
    """The batch size and steps per epoch from the training cases (a batch holds one slide per case); refuses
    data with too few cases or a batch that does not split evenly over the torchrun ranks."""
    train_rows, val_rows = pairs.indices("train"), pairs.indices("val")
    case_of = pairs.cases()
    train_cases = [case_of[i] for i in train_rows]
    n_cases = len(set(train_cases))
    by_case = n_cases < len(train_rows)  # else every row is its own case: plain shuffled batches, as ever
    batch_size = min(config.batch_size, n_cases)
    if n_cases < 2:
        raise InputError(
            f"{config.pairs}: the {len(train_rows)} training pairs are all one case (same patient_id, report or "
            "slide); contrastive training needs at least 2 cases"
        )
    if batch_size % world_size:
        raise UsageError(f"batch size {batch_size} must divide by the {world_size} processes (equal shares per rank)")
    if batch_size < config.batch_size:
        what = "cases (a batch holds one slide per case)" if by_case else "pairs"
        log.warning("only %d training %s: batch size lowered from %d", batch_size, what, config.batch_size)
    # the remainder is dropped; each epoch reshuffles
    steps_per_epoch = case_steps(train_cases, batch_size) if by_case else len(train_rows) // batch_size
    if by_case:
        log.info(
            "%d training pairs in %d cases: each batch holds at most one slide of a case; %d pairs per epoch "
            "are left over", len(train_rows), n_cases, len(train_rows) - steps_per_epoch * batch_size,
        )
    return _Plan(case_of, train_rows, val_rows, by_case, batch_size, steps_per_epoch)


def _build(
    config: TrainConfig, inputs: Inputs, plan: _Plan, resume_dir: Path | None, device: torch.device
) -> tuple[SlideTextModel, int]:
    """The model on its device, frozen as configured, with the reports tokenised by its tokenizer; returns it
    and how many reports the token limit cuts (warned here, counted in metrics.jsonl)."""
    model = build_model(config, inputs.slide_dim, resume_dir).to(device)
    apply_freezing(model, config)
    inputs.tokenize(model)
    assert inputs.tokens is not None
    rows = plan.train_rows + plan.val_rows
    truncated = inputs.tokens.count_truncated(rows)
    if truncated:
        log.warning("%d of %d reports exceed %d tokens and are truncated", truncated, len(rows), config.max_length)
    return model, truncated


def _set_up(
    config: TrainConfig,
    out: Path,
    dist_: Distributed,
    device: torch.device,
    inputs: Inputs,
    plan: _Plan,
    model: SlideTextModel,
    resume: bool,
) -> _Run:
    """Optimizer, schedule, AMP scaler and loss; a resumed run restores them, the weights, every RNG state and
    its position from the checkpoint, so that it continues as the uninterrupted run would have."""
    total_steps = plan.steps_per_epoch * config.epochs
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, round(0.05 * total_steps))
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = cosine_with_warmup(optimizer, warmup, total_steps)
    amp_dtype = autocast_dtype(device, config.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = create_loss(config.loss, dist_.rank, dist_.world_size)
    run = _Run(config, out, dist_, device, inputs, plan, model, optimizer, scheduler, scaler, loss_fn)
    if resume:
        state = load_checkpoint(out / CHECKPOINT)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        run.scheduler, run.extend_from = resume_schedule(
            optimizer, scheduler, state, warmup, total_steps, config.epochs, config.lr
        )
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        run.epoch, run.step_in_epoch = state["epoch"], state["step_in_epoch"]
        run.global_step, run.best = state["global_step"], state["best"]
        log.info("resumed %s at epoch %d, step %d", out, run.epoch, run.global_step)
    return run


def _open_run_folder(run: _Run, pairs: Pairs, truncated: int, resume: bool) -> MetricsLog:
    """Write what a run starts with (settings, splits, counts, `last/`'s architecture); a resumed run saves
    its settings now in force (an extension's epochs, read back by a later --resume) and trims metrics.jsonl
    to its checkpoint."""
    config, out, plan, main = run.config, run.out, run.plan, run.dist.main
    if main and not resume:
        make_output_folder(out)
    if main:
        config.save(out / CONFIG_FILE)
    if main and not resume:
        write_splits(out / "splits.csv", pairs)
    metrics = MetricsLog(out / "metrics.jsonl", main, run.global_step if resume else None)
    if not resume:
        counts = {f"pairs/{split}": len(pairs.indices(split)) for split in SPLITS}
        cases = {f"cases/{split}": len({plan.case_of[i] for i in pairs.indices(split)}) for split in SPLITS}
        metrics.write({"step": 0, **counts, **cases, "truncated_reports": truncated, "max_length": config.max_length,
                       "definitions": METRIC_DEFINITIONS})
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    log.info(
        "training %d pairs, %d steps/epoch × %d epochs, batch %d, %s trainable parameters on %s",
        len(plan.train_rows), plan.steps_per_epoch, config.epochs, plan.batch_size, f"{trainable:,}", run.device,
    )
    if not resume and main:
        run.model.save_pretrained(out / "last")  # the architecture a resumed run rebuilds
    return metrics


def _train_epochs(run: _Run, metrics: MetricsLog, progress: bool) -> None:
    """Each remaining epoch: its batches (reshuffled per epoch, from the seed), its steps, validation, saving."""
    config, plan = run.config, run.plan
    while run.epoch < config.epochs:
        generator = torch.Generator().manual_seed(config.seed * 100_003 + run.epoch)
        if plan.by_case:
            batches = case_batches(plan.train_cases, plan.batch_size, generator)
        else:
            order = torch.randperm(len(plan.train_rows), generator=generator).tolist()
            batches = [order[i * plan.batch_size : (i + 1) * plan.batch_size] for i in range(plan.steps_per_epoch)]
        run.model.train()
        _train_steps(run, batches, metrics, progress)
        run.step_in_epoch = 0
        record = {"step": run.global_step, "epoch": run.epoch, **_validate(run)}
        metrics.write(record)
        run.epoch += 1
        _save_epoch(run, record)


def _train_steps(run: _Run, batches: list[list[int]], metrics: MetricsLog, progress: bool) -> None:
    """The epoch's steps from `run.step_in_epoch` on, one metrics record each; checkpoints every
    `checkpoint_every` steps (the epoch's end has its own)."""
    config, plan, dist_ = run.config, run.plan, run.dist
    steps = range(run.step_in_epoch, plan.steps_per_epoch)
    for step in tqdm(steps, desc=f"epoch {run.epoch}", unit="step", disable=not (progress and dist_.main)):
        batch = [plan.train_rows[i] for i in batches[step]]
        mine = batch[dist_.rank :: dist_.world_size]
        lr = run.scheduler.get_last_lr()[0]
        tile_seed = config.seed * 1_000_003 + run.global_step
        started = time.perf_counter()
        try:
            loss = _train_step(run.model, run.inputs, mine, run.loss_fn, run.optimizer, run.scaler, config,
                               run.device, tile_seed, dist_)
        except FloatingPointError as error:
            raise NonFiniteError(
                f"{run.out}: epoch {run.epoch}, step {run.global_step + 1}: {error}. Training stopped; nothing of "
                f"this step was saved (`model/`, `last/` and the checkpoint hold step {run.global_step} or earlier)"
            ) from None
        loss["step_seconds"] = round(time.perf_counter() - started, 4)
        run.scheduler.step()
        run.global_step += 1
        metrics.write({"step": run.global_step, "epoch": run.epoch, **loss, "lr": lr})
        if config.checkpoint_every and run.global_step % config.checkpoint_every == 0:
            if step + 1 < plan.steps_per_epoch:
                _save_checkpoint(run, run.epoch, step + 1)


def _validate(run: _Run) -> dict[str, float]:
    """The epoch's validation metrics (none without a validation split); a non-finite loss stops the run
    before this epoch's model is saved."""
    if not run.plan.val_rows:
        return {}
    config = run.config
    record = evaluate(run.model, run.inputs, run.plan.val_rows, create_loss(config.loss), config, run.plan.case_of)
    if not math.isfinite(record["val/loss"]):
        raise NonFiniteError(
            f"{run.out}: epoch {run.epoch}: non-finite validation loss ({record['val/loss']}); training stopped and "
            "this epoch's model was not saved"
        )
    log.info("epoch %d: %s", run.epoch, ", ".join(f"{k}={v:.4f}" for k, v in record.items()))
    return record


def _save_epoch(run: _Run, record: dict[str, Any]) -> None:
    """The end of an epoch on disk: `last/`, `model/` when it is the best so far (always without a validation
    split), then the checkpoint with the new best; a kill before the checkpoint resumes at the previous one."""
    if run.dist.main:
        run.model.save_pretrained(run.out / "last")
        score = record.get("val/mean_recall", -math.inf)
        if not run.plan.val_rows or score > run.best:
            run.best = score if run.plan.val_rows else run.best
            run.model.save_pretrained(run.out / "model")
    _save_checkpoint(run, run.epoch, 0)


def _save_checkpoint(run: _Run, next_epoch: int, next_step: int) -> None:
    """Rank 0 writes the run's state (`checkpoint.save_checkpoint`), positioned at the next step to run."""
    if run.dist.main:
        save_checkpoint(
            run.out / CHECKPOINT, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
            scaler=run.scaler, epoch=next_epoch, step_in_epoch=next_step, global_step=run.global_step,
            best=run.best, config=dataclasses.asdict(run.config), lr_extend_from=run.extend_from,
        )


def _result(run: _Run, metrics: MetricsLog) -> TrainResult:
    """The `TrainResult` from the run's epoch records: `model/` holds the first epoch reaching the best score
    (the last epoch without a validation split)."""
    records = {record["epoch"]: record for record in metrics.epochs}
    last = run.epoch - 1
    if run.plan.val_rows:
        best_epoch = next((e for e, r in records.items() if r.get("val/mean_recall") == run.best), None)
    else:
        best_epoch = last if last >= 0 else None
    return TrainResult(run.out / "model", best_epoch, dict(records.get(last, {})))


def _train_step(
    model: SlideTextModel,
    inputs: Inputs,
    rows: list[int],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    device: torch.device,
    tile_seed: int,
    dist_: Distributed,
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
        average_gradients(model, dist_.world_size)
        torch.distributed.all_reduce(loss)
        loss = loss / dist_.world_size
    if not torch.isfinite(loss):  # before the optimizer step: the weights stay those of the last finite step
        ids = [inputs.pairs.slide_ids[i] for i in rows]
        raise NonFiniteError(f"non-finite training loss ({float(loss)}) on a batch of slides {ids[:10]}")
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf)
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        model.logit_scale.clamp_(0, model.config.max_logit_scale)
    return {"train/loss": float(loss), "grad_norm": float(grad_norm), "logit_scale": float(model.scale().detach())}

"""Subcommand `vlm train`: align slides with reports (frozen slide embeddings or full fine-tuning)."""

from __future__ import annotations

import argparse
import dataclasses
import logging

log = logging.getLogger(__name__)

_EPILOG = """examples:
  vlm train --pairs reports.csv --slide-embeddings runs/slides.parquet --out runs/align
  vlm train --pairs reports.csv --features runs/features --out runs/align-full \\
      --slide-checkpoint slide_encoder.pth --contrastive-batch 256 --chunk-size 4
  vlm train --resume runs/align          # continue after a crash (flags come from the run's config)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from vlm.commands.slides import add_feature_file_options

    p = subparsers.add_parser(
        "train", help="train slide–report alignment (CLIP-style)", epilog=_EPILOG,
        description="Train a slide–report model; writes <out>/model/ (use as --model), metrics.jsonl, checkpoints.",
    )  # fmt: skip
    data = p.add_argument_group("data")
    data.add_argument("--pairs", help="CSV / Parquet / JSONL with slide_id, report [, patient_id, split]")
    slides = data.add_mutually_exclusive_group()
    slides.add_argument("--slide-embeddings", help="slide embeddings parquet from `vlm embed-slides` (frozen tower)")
    slides.add_argument("--features", help="folder of <slide_id>.h5 tile features (fine-tunes the slide encoder)")
    add_feature_file_options(data)
    data.add_argument("--out", help="run folder (model/, metrics.jsonl, checkpoints/)")
    data.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    data.add_argument(
        "--val-fraction", type=float, default=0.1, help="validation share of patients without a split column"
    )
    data.add_argument("--test-fraction", type=float, default=0.0, help="test share of patients without a split column")
    data.add_argument(
        "--drop-missing",
        action="store_true",
        help="drop pairs whose slide has no embedding, or no usable feature file (all are listed first)",
    )
    data.add_argument("--max-tiles", type=int, default=None, help="subsample slides to this many tiles in training")

    model = p.add_argument_group("model")
    model.add_argument(
        "--text-encoder",
        default=None,
        help="hub id or local folder of a BERT-family model "
        "(default PubMedBERT: microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext)",
    )
    model.add_argument("--max-length", type=int, default=256, help="tokens per report; longer ones are truncated")
    model.add_argument("--proj-dim", type=int, default=512, help="shared embedding dimension")
    model.add_argument("--slide-encoder", default="gigapath", help="slide encoder preset for --features")
    model.add_argument("--slide-checkpoint", default=None, help="slide encoder weights (slide_encoder.pth)")
    model.add_argument("--pool", default="mean", choices=("mean", "cls", "all-layers"), help="slide encoder pooling")
    model.add_argument("--loss", choices=("clip", "siglip"), default="clip")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=None, help="epochs (default 10; with --resume: extend the run)")
    opt.add_argument(
        "--batch-size",
        "--contrastive-batch",
        dest="batch_size",
        type=int,
        default=64,
        help="pairs per contrastive batch and optimizer step",
    )
    opt.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="GradCache chunk: pairs embedded with gradients at once (default: whole batch when "
        "frozen, 4 when fine-tuning)",
    )
    opt.add_argument("--lr", type=float, default=1e-4)
    opt.add_argument("--weight-decay", type=float, default=0.2)
    opt.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default 5%% of all steps)")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    opt.add_argument("--freeze-slide", action="store_true", help="keep the slide encoder fixed (heads still train)")
    opt.add_argument("--freeze-text", action="store_true", help="keep the text transformer fixed (heads still train)")
    opt.add_argument("--unfreeze-text-last", type=int, default=0, help="train only the last N text layers")
    opt.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    opt.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    opt.add_argument("--eval-batch-size", type=int, default=64, help="pairs per batch when validating")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--device", default="auto")
    opt.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                     help="autocast on CUDA ('auto' = bf16 where supported); CPU runs fp32")
    opt.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlm.settings import DEFAULT_TEXT_ENCODER
    from vlm.train.config import CONFIG_FILE, TrainConfig
    from vlm.train.loop import train

    if args.resume:
        config = TrainConfig.load(Path(args.resume) / CONFIG_FILE)
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise ValueError(f"--out {args.out} differs from --resume {args.resume}; a resumed run stays in its folder")
        config = dataclasses.replace(config, out=str(args.resume))  # the folder may have moved since
        if args.epochs is not None:
            config = dataclasses.replace(config, epochs=args.epochs)
        log.info(
            "resuming %s with its saved %s (flags other than --epochs are not re-read)",
            args.resume,
            CONFIG_FILE,
        )
        model_dir = train(config, resume=True, progress=not args.no_progress)
    else:
        missing = [flag for flag, value in (("--pairs", args.pairs), ("--out", args.out)) if not value]
        if missing or not (args.slide_embeddings or args.features):
            missing += [] if (args.slide_embeddings or args.features) else ["--slide-embeddings or --features"]
            raise ValueError(f"vlm train needs {', '.join(missing)} (or --resume RUN)")
        config = TrainConfig(
            pairs=args.pairs, out=args.out, slide_embeddings=args.slide_embeddings, features=args.features,
            mpp=args.mpp, patches=args.patches, slide_encoder=args.slide_encoder,
            slide_checkpoint=args.slide_checkpoint, pool=args.pool,
            max_tiles=args.max_tiles, text_encoder=args.text_encoder or DEFAULT_TEXT_ENCODER,
            max_length=args.max_length, proj_dim=args.proj_dim, loss=args.loss, epochs=args.epochs or 10,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
            grad_clip=args.grad_clip, freeze_slide=args.freeze_slide, freeze_text=args.freeze_text,
            unfreeze_text_last=args.unfreeze_text_last, grad_checkpointing=args.grad_checkpointing,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, drop_missing=args.drop_missing,
            checkpoint_every=args.checkpoint_every, eval_batch_size=args.eval_batch_size, seed=args.seed,
            device=args.device, precision=args.precision,
        )  # fmt: skip
        model_dir = train(config, progress=not args.no_progress)
    print(f"model -> {model_dir}")
    return 0

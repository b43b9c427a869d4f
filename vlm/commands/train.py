"""Subcommand `vlm train`: align slides with reports (frozen slide embeddings or full fine-tuning)."""

from __future__ import annotations

import argparse
import logging

from vlm.errors import UsageError

log = logging.getLogger(__name__)

_EPILOG = """examples:
  vlm train --pairs reports.csv --embeddings runs/slides.parquet --out runs/align
  vlm train --pairs reports.csv --features runs/features --out runs/align-full \\
      --slide-checkpoint slide_encoder.pth --contrastive-batch 256 --chunk-size 4
  vlm train --resume runs/align          # continue after a crash (flags come from the run's config)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from vlm.commands.options import add_config_options, add_progress
    from vlm.training.config import TrainConfig

    p = subparsers.add_parser(
        "train", help="train slide–report alignment (CLIP-style)", epilog=_EPILOG,
        description="Train a slide–report model; writes <out>/model/ (use as --model), metrics.jsonl, checkpoints. "
        "Every setting is a field of vlm.TrainConfig, with the same default. A report describes a case: rows of "
        "the pairs sharing a patient_id, report text or slide_id are one case, a batch never holds two slides of "
        "a case, and validation recall counts any slide of the report's case (definitions in metrics.jsonl's "
        "first line).",
    )
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint, with "
                   "its saved settings (only --epochs may change)")
    add_progress(p)
    add_config_options(p, TrainConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlm.commands.options import given_settings
    from vlm.training.config import CONFIG_FILE, TrainConfig
    from vlm.training.loop import train

    given = given_settings(args, TrainConfig)
    if args.resume:
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise UsageError(f"--out {args.out} differs from --resume {args.resume}; a resumed run stays in its folder")
        saved = Path(args.resume) / CONFIG_FILE
        changes = {name: value for name, value in given.items() if name != "out"}
        config = TrainConfig.load(saved).resumed(args.resume, changes, saved)  # the folder may have moved since
        log.info("resuming %s with its saved %s", args.resume, CONFIG_FILE)
        result = train(config, resume=True, progress=not args.no_progress)
    else:
        missing = [flag for flag, name in (("--pairs", "pairs"), ("--out", "out")) if name not in given]
        if not ({"embeddings", "features"} & set(given)):
            missing.append("--embeddings or --features")
        if missing:
            raise UsageError(f"vlm train needs {', '.join(missing)} (or --resume RUN)")
        result = train(TrainConfig(**given), progress=not args.no_progress)
    print(f"model -> {result.model_dir}")
    return 0

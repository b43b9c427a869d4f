"""Subcommand `vlm embed-slides` (tile features -> one GigaPath slide embedding per slide, in a parquet)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vlm.commands import finish_batch
from vlm.commands.options import (
    add_device,
    add_feature_file_options,
    add_overwrite,
    add_pool,
    add_precision,
    add_progress,
    add_random_weights,
    add_shard,
    seed_random_weights,
)
from vlm.errors import UsageError

log = logging.getLogger(__name__)


def _feature_width(files: list[Path]) -> int | None:
    """The tile-feature width D shared by the readable files (`features` [N, D]), from shapes only.

    Unreadable files are left to the batch, which lists them in failures.csv; None when no file tells.
    """
    from vlm.formats.features import feature_shape

    widths: dict[int, Path] = {}
    for path in files:
        try:
            shape = feature_shape(path)
        except ValueError as error:
            log.debug("%s; the batch will report it", error)
            continue
        if shape:
            widths.setdefault(int(shape[-1]), path)
    if len(widths) > 1:
        seen = ", ".join(f"{width} ({path.name})" for width, path in sorted(widths.items()))
        raise UsageError(f"feature files of different widths: {seen}; embed all slides with one tile encoder")
    return next(iter(widths), None)


def _embed_slides(args: argparse.Namespace) -> int:
    from vlm.batch import Shard
    from vlm.device import resolve_shard_device
    from vlm.encoders.slide import create_slide_encoder
    from vlm.formats.embeddings import shard_output
    from vlm.formats.features import feature_files
    from vlm.slide_embeddings import embed_slides

    seed_random_weights(args)
    if args.checkpoint is None and args.slide_encoder != "gigapath" and not args.random_weights:
        raise UsageError(
            f"--slide-encoder {args.slide_encoder} has no published weights; pass --checkpoint, or "
            "--random-weights for an untrained encoder"
        )
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    files = feature_files(args.features)
    width = _feature_width(files)
    if args.in_dim is not None and width is not None and args.in_dim != width:
        raise UsageError(f"--in-dim {args.in_dim} but the feature files in {args.features} are {width}-d; "
                         "drop --in-dim (it is read from the files) or embed the tiles with a matching encoder")
    in_dim = args.in_dim or width
    shard = Shard.parse(args.shard)
    device = resolve_shard_device(args.device, shard.index, shard.count)
    width_override = {} if in_dim is None else {"in_dim": in_dim}
    encoder = create_slide_encoder(
        args.slide_encoder, checkpoint=args.checkpoint, pretrained=not args.random_weights, **width_override
    )
    report = embed_slides(
        files, args.out, encoder, pool=args.pool, device=device,
        batch_size=args.batch_size, shard=shard, progress=not args.no_progress, overwrite=args.overwrite,
        mpp=args.mpp, patches=args.patches, precision=args.precision, compile=args.compile,
        checkpoint=None if args.random_weights else args.checkpoint,  # random weights: their hash is recorded
    )
    return finish_batch(report, shard_output(args.out, shard))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed-slides",
        help="embed each slide (tile features) with the GigaPath slide encoder",
        description="One row per slide: slide_id, embedding, n_tiles, encoder, pool. With --shard i/n (or "
        "torchrun) and n > 1, shard i writes <out stem>.shard-i-of-n.parquet.",
    )
    parser.add_argument("features", help="folder of <slide_id>.h5 tile-feature files (from `vlm embed-tiles`)")
    parser.add_argument("--out", required=True, help="output parquet, e.g. runs/slides.parquet")
    parser.add_argument("--slide-encoder", default="gigapath", help="preset: 'gigapath' or 'tiny'")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="local slide_encoder.pth (else prov-gigapath/prov-gigapath from the hub)",
    )
    add_random_weights(parser, "slide")
    parser.add_argument(
        "--in-dim",
        type=int,
        default=None,
        help="tile-feature width the slide encoder takes, checked against the files (default: the files' width)",
    )
    add_pool(parser)
    add_device(parser)
    add_precision(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="slides per forward pass")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the encoder's token-wise layers (GPU: fewer kernel launches)",
    )
    add_feature_file_options(parser)
    add_shard(parser)
    add_overwrite(parser, "recompute slides already in the output")
    add_progress(parser)
    parser.set_defaults(func=_embed_slides)

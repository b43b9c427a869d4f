"""Subcommands `vlm info`, `vlm tile` and `vlm embed-tiles` (slides -> tile grids -> tile features)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict

from vlm.commands import finish_batch
from vlm.commands.options import (
    add_device,
    add_overwrite,
    add_precision,
    add_progress,
    add_random_weights,
    add_reader,
    add_shard,
    seed_random_weights,
)
from vlm.errors import describe

log = logging.getLogger(__name__)


def _add_slide_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", metavar="SLIDES",
                        help="slide files, folders (searched recursively) and/or .txt files listing paths")
    parser.add_argument("--mpp", type=float, default=None,
                        help="level-0 µm/px for slides that do not record it (overrides the file's value)")
    add_reader(parser)


def _add_tiling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target-mpp", type=float, default=0.5, help="µm/px of the tiles")
    parser.add_argument("--tile-size", type=int, default=256, help="tile side in px at --target-mpp")
    parser.add_argument("--min-tissue", type=float, default=0.1,
                        help="minimum tissue fraction for a tile to be kept")


def _add_batch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    add_shard(parser)
    add_overwrite(parser, "redo slides whose output already exists")
    add_progress(parser)


def _info(args: argparse.Namespace) -> int:
    from vlm.wsi.collect import collect_slides
    from vlm.wsi.slide import open_slide

    status = 0
    for path in collect_slides(args.slides):
        try:
            with open_slide(path, mpp=args.mpp, reader=args.reader) as slide:
                print(json.dumps(asdict(slide.info())))
        except ValueError as error:  # this slide fails; the others are still shown
            log.error("%s", describe(error))
            status = 1
    return status


def _tile(args: argparse.Namespace) -> int:
    from vlm.batch import Shard
    from vlm.tile import tile_slides
    from vlm.wsi.collect import collect_slides
    from vlm.wsi.tiling import TilingParams

    params = TilingParams(target_mpp=args.target_mpp, tile_size=args.tile_size, min_tissue=args.min_tissue)
    shard = Shard.parse(args.shard)
    report = tile_slides(
        collect_slides(args.slides), args.out, params=params, mpp=args.mpp, workers=args.workers,
        shard=shard, progress=not args.no_progress, overwrite=args.overwrite, reader=args.reader,
    )
    return finish_batch(report, args.out)


def _embed_tiles(args: argparse.Namespace) -> int:
    from vlm.batch import Shard
    from vlm.device import resolve_shard_device
    from vlm.encoders.tile import create_tile_encoder
    from vlm.tile_features import embed_tiles
    from vlm.wsi.collect import collect_slides
    from vlm.wsi.tiling import TilingParams

    slides = collect_slides(args.slides)
    params = TilingParams(target_mpp=args.target_mpp, tile_size=args.tile_size, min_tissue=args.min_tissue)
    shard = Shard.parse(args.shard)
    device = resolve_shard_device(args.device, shard.index, shard.count)
    seed_random_weights(args)
    encoder = create_tile_encoder(args.tile_encoder, checkpoint=args.checkpoint, pretrained=not args.random_weights)
    report = embed_tiles(
        slides, args.out, encoder, device, precision=args.precision, batch_size=args.batch_size,
        workers=args.workers, params=params, tiles_dir=args.tiles, mpp=args.mpp, dtype=args.dtype,
        shard=shard, progress=not args.no_progress, overwrite=args.overwrite, compile=args.compile,
        reader=args.reader,
    )
    return finish_batch(report, args.out)


def register(subparsers: argparse._SubParsersAction) -> None:
    info = subparsers.add_parser(
        "info", help="print each slide's dimensions, levels, mpp and objective power",
        description="One JSON line per slide (dimensions, pyramid levels, level-0 µm/px, objective power), read "
        "with OpenSlide; check here that a slide records its mpp before tiling it.",
    )
    _add_slide_inputs(info)
    info.set_defaults(func=_info)

    tile = subparsers.add_parser(
        "tile", help="detect tissue and write tile grids + QC thumbnails",
        description="For each slide: an Otsu tissue mask, a grid of --tile-size px tiles at --target-mpp keeping "
        "tiles with at least --min-tissue tissue, written to <out>/<slide_id>.h5 with a QC thumbnail. "
        "Finished slides are skipped; failures are listed in <out>/failures.csv (exit status 1).",
    )
    _add_slide_inputs(tile)
    _add_tiling_options(tile)
    _add_batch_options(tile)
    tile.add_argument("--workers", type=int, default=2, help="slides processed in parallel")
    tile.set_defaults(func=_tile)

    embed = subparsers.add_parser(
        "embed-tiles", help="embed the tiles of each slide into <slide_id>.h5",
        description="Reads each slide's tiles (grids from --tiles, else tiled on the fly) and writes "
        "<out>/<slide_id>.h5 with one feature vector per tile and its coordinates. The Prov-GigaPath tile "
        "encoder needs hub access or --checkpoint; --random-weights gives an untrained encoder for offline "
        "smoke tests.",
    )
    _add_slide_inputs(embed)
    _add_tiling_options(embed)
    _add_batch_options(embed)
    embed.add_argument("--tile-encoder", default="gigapath", help="'gigapath' or 'timm:<model_name>'")
    embed.add_argument("--checkpoint", default=None, help="local tile-encoder weights (else the hub's)")
    add_random_weights(embed, "tile")
    embed.add_argument("--tiles", default=None, help="folder of `vlm tile` outputs to take the grids from")
    add_device(embed)
    add_precision(embed)
    embed.add_argument("--batch-size", type=int, default=128, help="tiles per forward pass")
    embed.add_argument("--workers", type=int, default=2, help="processes reading tiles for all slides as one stream")
    embed.add_argument("--compile", action="store_true",
                       help="torch.compile the tile encoder (CUDA: faster after a minute of compiling)")
    embed.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored feature dtype")
    embed.set_defaults(func=_embed_tiles)

"""Subcommands `vlm heatmap` (text -> tile heatmaps: PNG, QuPath GeoJSON, CSV) and `vlm serve` (search + viewer)."""

from __future__ import annotations

import argparse
import logging

from vlm.errors import MissingInputError, UsageError

log = logging.getLogger(__name__)

_HEATMAP_EPILOG = """examples:
  vlm heatmap --model runs/align/model --features runs/features/S1.h5 --slide slides/S1.svs \\
      --query "papillary fronds with fibrovascular cores" --out runs/heatmaps
  vlm heatmap --model runs/align/model --features runs/features --slide slides --query "necrosis" \\
      --query "keratin pearls" --out runs/heatmaps --slide-checkpoint slide_encoder.pth
  vlm heatmap --model runs/align/model --features runs/features --slide slides --task prompts/demo_morphology.yaml \\
      --out runs/heatmaps_task --method occlusion
"""
_SERVE_EPILOG = """examples:
  vlm serve --index runs/index --slides slides --features runs/features --task prompts/demo_morphology.yaml
  vlm serve --index demo_out/index --slides demo_out/slides --features demo_out/features --port 8080
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from vlm.commands.options import add_device, add_precision

    p = subparsers.add_parser(
        "heatmap", help="text -> tile heatmaps of slides (PNG, QuPath GeoJSON, CSV)", epilog=_HEATMAP_EPILOG,
        description="Writes <out>/<slide_id>.png, .geojson, .csv and .json per slide (the .json holds each map's "
        "faithfulness: deletion / insertion against random tile orders) and <out>/summary.csv.",
    )
    p.add_argument("--model", required=True, help="model folder written by `vlm train` (…/model)")
    p.add_argument("--features", required=True, nargs="+", help="tile-feature .h5 files or folders of them")
    p.add_argument("--slide", nargs="+", default=[], help="slide files or folders (default: the path in the .h5)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--query", action="append", help="text to score tiles against (repeatable, each once)")
    target.add_argument("--task", help="prompt file: one map per class, the class against the task's other classes")
    p.add_argument("--task-target", choices=("contrast", "class"), default="contrast",
                   help="with --task: each class against the others (what the prediction compares; default) or "
                   "the class's prompts alone")
    p.add_argument("--method", choices=("share", "occlusion"), default="share",
                   help="tile attribution: linear shares of the slide score (exact, one pass) or region occlusion "
                   "(blocks of tiles removed and the slide re-encoded); each map's faithfulness is written beside "
                   "it, so compare them on your data")
    p.add_argument("--block", default="auto",
                   help="occlusion block side in tiles ('auto': about 64 blocks per slide)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--slide-checkpoint", help="slide encoder weights (default: the one the model records)")
    p.add_argument("--mpp", type=float, help="level-0 µm/px of the slides, if the feature files lack it")
    p.add_argument("--cache-dir", help="prompt-embedding cache for --task")
    add_device(p)
    add_precision(p)
    p.set_defaults(func=_heatmap)

    s = subparsers.add_parser(
        "serve", help="local web app: text search, similar slides, deep-zoom viewer with heatmaps",
        epilog=_SERVE_EPILOG,
        description="Serves the search page and slide viewer over HTTP on 127.0.0.1 (this machine only).",
    )
    s.add_argument("--index", required=True, help="slide index folder from `vlm index build`")
    s.add_argument("--model", help="model folder (default: the one recorded in the index manifest)")
    s.add_argument("--slides", nargs="+", default=[], help="folders of slide files (the only files served)")
    s.add_argument("--features", nargs="+", default=[], help="folders of tile-feature .h5 files (heatmaps)")
    s.add_argument("--task", help="prompt file: zero-shot probabilities on each slide page")
    s.add_argument("--slide-checkpoint", help="slide encoder weights (default: the one the model records)")
    s.add_argument(
        "--host", default="127.0.0.1",
        help="address to bind (127.0.0.1: this machine only); requests naming another host are refused (400)",
    )
    s.add_argument("--port", type=int, default=8000, help="TCP port, 0–65535 (0: a free one, printed)")
    s.add_argument(
        "--allow-remote", action="store_true",
        help="allow a --host other than localhost: anyone who can reach it sees the slides (no authentication)",
    )
    s.set_defaults(func=_serve)


def _heatmap(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlm.commands import finish_batch
    from vlm.device import resolve_device
    from vlm.formats.features import feature_files
    from vlm.heatmap import run_heatmaps, task_targets
    from vlm.io import check_output_folder
    from vlm.model.clip import SlideTextModel

    check_output_folder(args.out, "heatmaps")  # before the model loads
    paths = [p for entry in map(Path, args.features) for p in (feature_files(entry) if entry.is_dir() else [entry])]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MissingInputError(f"feature file(s) not found: {missing[:5]}")
    block = args.block if args.block == "auto" else int(args.block)
    model = SlideTextModel.from_pretrained(args.model, device=resolve_device(args.device))
    options = {"slide_checkpoint": args.slide_checkpoint, "mpp": args.mpp, "method": args.method, "block": block,
               "device": args.device, "precision": args.precision}
    if args.task:
        from vlm.io import slide_id_from_path

        _, labels, vectors = task_targets(model, args.task, None, args.task_target, args.cache_dir)
        per_slide = {slide_id_from_path(p): (labels, vectors) for p in paths}
        report = run_heatmaps(model, paths, args.slide, args.out, per_slide=per_slide, **options)
    else:
        report = run_heatmaps(model, paths, args.slide, args.out, queries=args.query, **options)
    return finish_batch(report, args.out)


def _serve(args: argparse.Namespace) -> int:
    try:
        from vlm.serve.app import LOCAL_HOSTS, WILDCARD_HOSTS, serve
    except ImportError as error:
        raise ImportError(f"vlm serve needs FastAPI, uvicorn, Jinja2 ({error}); pip install -e '.[serve]'") from error

    if args.host not in LOCAL_HOSTS and not args.allow_remote:
        raise UsageError(
            f"--host {args.host} would expose the slides to other machines without authentication; "
            "add --allow-remote if that is intended"
        )
    if args.host not in LOCAL_HOSTS:
        log.warning("serving on %s: anyone who can reach this address can search and view the slides", args.host)
    if args.host in WILDCARD_HOSTS:
        log.warning("--host %s: only requests addressed to %s are answered (Host header check); give --host the "
                    "address or name other machines use", args.host, "/".join(LOCAL_HOSTS))
    serve(args.index, model=args.model, slides=args.slides, features=args.features, task=args.task,
          slide_checkpoint=args.slide_checkpoint, host=args.host, port=args.port)
    return 0

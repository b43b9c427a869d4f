"""Subcommands `vlm zeroshot` (slides × prompt task -> probabilities, metrics) and `vlm prompts check`."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlm.errors import UsageError

log = logging.getLogger(__name__)


def _check_heatmaps(args: argparse.Namespace) -> str | None:
    """The tile-feature folder of --heatmaps, checked with the heatmaps' folder before zero-shot runs."""
    from pathlib import Path

    if not args.heatmaps:
        return None
    features = args.heatmap_features or args.features
    if not features or not Path(features).is_dir():
        raise UsageError("--heatmaps needs the tile features: give --heatmap-features DIR (or --features DIR)")
    if args.level == "case":
        raise UsageError("--heatmaps draws one heatmap per slide: run it with --level slide")
    from vlm.io import check_output_folder

    if Path(args.heatmaps).absolute() == Path(args.out).absolute():
        raise UsageError(f"--heatmaps {args.heatmaps} is --out; give the heatmaps their own folder, e.g. OUT/heatmaps")
    check_output_folder(args.heatmaps, "heatmaps", option="--heatmaps")  # before zero-shot runs, not after
    return features


def _embedder(args: argparse.Namespace) -> Callable[[Any, Path, Any, str, bool], None]:
    """`--features`: embed the folder with the model's own slide encoder once run_zeroshot has checked the rest."""

    def embed(model: Any, target: Path, device: Any, precision: str, progress: bool) -> None:  # a `vlm.zeroshot.Embed`
        from vlm.slide_embeddings import embed_with_model

        report = embed_with_model(args.features, model, target, device=device, precision=precision,
                                  progress=progress, mpp=args.mpp, patches=args.patches)
        if report.failed:
            log.error("%d slides failed to embed (listed in %s) and are not scored", len(report.failed), args.out)

    return embed


def _zeroshot(args: argparse.Namespace) -> int:
    from vlm.zeroshot import run_zeroshot

    features = _check_heatmaps(args)
    result = run_zeroshot(
        args.model,
        args.embeddings or args.features,
        args.out,
        task=args.task,
        classes=args.classes,
        positive=args.positive,
        labels=args.labels,
        label_column=args.label_column,
        allow_missing_slides=args.allow_missing_slides,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        n_boot=args.n_boot,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
        level=args.level,
        embed=_embedder(args) if args.features else None,
    )
    status = 0
    if args.heatmaps:
        from vlm.commands import finish_batch
        from vlm.heatmap import zeroshot_heatmaps

        report = zeroshot_heatmaps(args.model, Path(args.out) / "predictions.csv", args.task, args.classes, features,
                                   args.heatmap_slides, args.heatmaps, cache_dir=args.cache_dir,
                                   slide_checkpoint=args.slide_checkpoint, target=args.heatmap_target,
                                   device=args.device)
        print("heatmaps of the predicted classes:", end=" ")
        status = finish_batch(report, args.heatmaps)
    if "metrics" in result:
        sets = result.get("prompt_sets")
        if sets:
            print(f"median over {sets['n_sets']} prompt sets (MI-Zero headline) [min, max over sets]:")
        _print_metrics(result["metrics"])
        if sets:
            print("pooled ensemble of all prompts of all sets (the predictions) [95% CI]:")
            _print_metrics(result["pooled_ensemble"]["metrics"])
        print(f"{result['n_evaluated']} of {result['n_scored']} slides evaluated -> {args.out}")
    else:
        print(f"{result['n_slides']} slides scored (no labels) -> {args.out}")
    return status


def _print_metrics(metrics: dict) -> None:
    """One line per metric: value and its CI, or (MI-Zero medians) the range over prompt sets."""
    for name, metric in metrics.items():
        value = "n/a" if metric["value"] is None else f"{metric['value']:.3f}"
        low, high = (metric["min"], metric["max"]) if "min" in metric else (metric["ci_low"], metric["ci_high"])
        print(f"{name:>18}: {value}" + ("" if low is None else f"  [{low:.3f}, {high:.3f}]"))


def _prompts_check(args: argparse.Namespace) -> int:
    from vlm.prompts import load_prompt_task, prompt_files
    from vlm.resources import PROMPTS_DIR

    status = 0
    for path in prompt_files(args.paths or [PROMPTS_DIR]):
        try:
            summary = load_prompt_task(path).summary()
        except ValueError as error:
            print(f"FAIL {error}")
            status = 1
            continue
        n_sets = summary["prompt_sets"]
        sets = f", {n_sets} prompt sets" if n_sets > 1 else ""
        positive = f", positive {summary['positive']}" if summary["positive"] else ""
        print(f"ok   {path} [{summary['format']}, {summary['type']}{positive}{sets}]")
        for code in summary["classes"]:
            if n_sets == 1:
                line = (
                    f"{summary['synonyms'][code]} synonyms × {summary['templates'][0]} templates"
                    f" = {summary['prompts'][code]} prompts"
                )
            else:  # MI-Zero: the same synonyms recur across sets; count each once
                low, high = summary["templates"][0], summary["templates"][-1]
                line = (
                    f"{summary['synonyms'][code]} distinct synonyms, {low}-{high} templates per set "
                    f"({summary['distinct_templates']} distinct) = {summary['prompts'][code]} distinct prompts"
                )
            print(f"       {code}: {line}")
    return status


def register(subparsers: argparse._SubParsersAction) -> None:
    from vlm.commands.options import (
        add_bootstrap,
        add_deprecated,
        add_device,
        add_feature_file_options,
        add_precision,
        add_progress,
        add_seed,
    )

    parser = subparsers.add_parser(
        "zeroshot",
        help="zero-shot classify slides with a prompt task; with labels, metrics with bootstrap CIs",
        description="Writes predictions.csv, prompts_used.json, run.json and, with --labels, metrics.json, "
        "roc.png and confusion.png to --out.",
    )
    parser.add_argument("--model", required=True, help="model folder written by `vlm train` (…/model)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--task",
        help="prompt file (vlm task YAML, CONCH / MI-Zero JSON or TITAN YAML) or the name of a task shipped "
        "with vlm, e.g. nsclc_subtyping (the files of prompts/)",
    )
    what.add_argument(
        "--classes",
        nargs="+",
        metavar="CODE=SYNONYM",
        help="classes on the command line, e.g. 'LUAD=lung adenocarcinoma|adenocarcinoma of the lung'",
    )
    parser.add_argument("--positive", help="with --classes and two classes: the positive class code")
    source = parser.add_mutually_exclusive_group(required=True)
    embeddings = source.add_argument("--embeddings", metavar="PARQUET",
                                     help="slide embeddings parquet from `vlm embed-slides`")
    features = source.add_argument("--features", metavar="DIR", help="folder of tile-feature .h5 files, embedded "
                                   "with the model's own slide encoder into OUT/slide_embeddings.parquet")
    add_deprecated(source, "--slides", embeddings, route=lambda value: features if Path(value).is_dir() else embeddings)
    add_feature_file_options(parser)
    parser.add_argument(
        "--labels",
        help="table (CSV/TSV/Parquet/JSONL) with slide_id and a label column (default: the task's column, e.g. "
        "a TITAN config's target or OncoTreeCode for CONCH / MI-Zero files, else label)",
    )
    parser.add_argument(
        "--label-column", help="label column in --labels (overrides the task's label column)"
    )
    parser.add_argument(
        "--allow-missing-slides",
        action="store_true",
        help="evaluate although some labelled slides were not scored (they are listed in metrics.json)",
    )
    parser.add_argument(
        "--level", choices=("slide", "case"), default="slide",
        help="slide: one prediction per slide; case: for labels given per case, one prediction per "
        "patient_id of --labels (it needs that column): the softmax of the mean of its slides' logits, metrics "
        "over cases, predictions.csv with each case's slide_ids",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--cache-dir", help="prompt-embedding cache (default $VLM_CACHE/prompts or ~/.cache/vlm/prompts)"
    )
    parser.add_argument("--no-cache", action="store_true", help="always encode the prompts; write no cache")
    add_bootstrap(parser)
    add_seed(parser, "bootstrap seed")
    add_device(parser)
    add_precision(parser)
    add_progress(parser)
    parser.add_argument("--heatmaps", metavar="DIR", help="also write each slide's heatmap of its predicted class")
    parser.add_argument("--heatmap-features", metavar="DIR", help="tile features for --heatmaps (default: --features)")
    parser.add_argument("--heatmap-slides", nargs="+", default=[], metavar="PATH",
                        help="slide files or folders for --heatmaps (default: the path in each .h5)")
    parser.add_argument("--heatmap-target", choices=("contrast", "class"), default="contrast",
                        help="--heatmaps map the predicted class against the other classes (default: the quantity "
                        "the prediction compares) or the class's prompts alone")
    parser.add_argument("--slide-checkpoint", help="slide encoder weights for --heatmaps (default: the recorded one)")
    parser.set_defaults(func=_zeroshot)

    prompts = subparsers.add_parser("prompts", help="work with zero-shot prompt files")
    actions = prompts.add_subparsers(dest="prompts_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="validate prompt files and print classes × synonyms × templates",
        description="Exit status 1 if any file is invalid; each error names the file and the field.",
    )
    check.add_argument(
        "paths",
        nargs="*",
        help="prompt files, folders of them (e.g. prompts/) or shipped task names; none: every shipped task",
    )
    check.set_defaults(func=_prompts_check)

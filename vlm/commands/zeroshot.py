"""Subcommands `vlm zeroshot` (slides × prompt task -> probabilities, metrics) and `vlm prompts check`."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def _zeroshot(args: argparse.Namespace) -> int:
    from vlm.zeroshot import run_zeroshot

    result = run_zeroshot(
        args.model,
        args.slides,
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
        progress=not args.no_progress,
    )
    if "metrics" in result:
        for name, metric in result["metrics"].items():
            value = "n/a" if metric["value"] is None else f"{metric['value']:.3f}"
            ci = "" if metric["ci_low"] is None else f"  [{metric['ci_low']:.3f}, {metric['ci_high']:.3f}]"
            print(f"{name:>18}: {value}{ci}")
        sets = result.get("prompt_sets")
        if sets:
            print(f"over {sets['n_sets']} prompt sets (median [min, max]):")
            for name, spread in sets["summary"].items():
                print(f"{name:>18}: {spread['median']:.3f}  [{spread['min']:.3f}, {spread['max']:.3f}]")
        print(f"{result['n_evaluated']} of {result['n_scored']} slides evaluated -> {args.out}")
    else:
        print(f"{result['n_slides']} slides scored (no labels) -> {args.out}")
    return 0


def _prompts_check(args: argparse.Namespace) -> int:
    from vlm.prompts import load_prompt_task, prompt_files

    status = 0
    for path in prompt_files(args.paths):
        try:
            summary = load_prompt_task(path).summary()
        except ValueError as error:
            print(f"FAIL {error}")
            status = 1
            continue
        templates = "/".join(map(str, summary["templates"]))
        sets = f", {summary['prompt_sets']} prompt sets" if summary["prompt_sets"] > 1 else ""
        positive = f", positive {summary['positive']}" if summary["positive"] else ""
        print(f"ok   {path} [{summary['format']}, {summary['type']}{positive}{sets}]")
        for code in summary["classes"]:
            print(
                f"       {code}: {summary['synonyms'][code]} synonyms × {templates} templates"
                f" = {summary['prompts'][code]} prompts"
            )
    return status


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "zeroshot",
        help="zero-shot classify slides with a prompt task; with labels, metrics with bootstrap CIs",
        description="Writes predictions.csv, prompts_used.json, run.json and, with --labels, metrics.json, "
        "roc.png and confusion.png to --out.",
    )
    parser.add_argument("--model", required=True, help="model folder written by `vlm train` (…/model)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--task", help="prompt file: vlm task YAML, CONCH / MI-Zero JSON or TITAN YAML")
    what.add_argument(
        "--classes",
        nargs="+",
        metavar="CODE=SYNONYM",
        help="classes on the command line, e.g. 'LUAD=lung adenocarcinoma|adenocarcinoma of the lung'",
    )
    parser.add_argument("--positive", help="with --classes and two classes: the positive class code")
    parser.add_argument(
        "--slides",
        required=True,
        help="slide embeddings parquet from `vlm embed-slides`, or a folder of tile-feature .h5 files "
        "(embedded with the model's own slide encoder)",
    )
    parser.add_argument("--labels", help="CSV with slide_id and a label column (default column: label)")
    parser.add_argument(
        "--label-column", help="label column in --labels (overrides the task's labels.column)"
    )
    parser.add_argument(
        "--allow-missing-slides",
        action="store_true",
        help="evaluate although some labelled slides were not scored (they are listed in metrics.json)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--cache-dir", help="prompt-embedding cache (default $VLM_CACHE/prompts or ~/.cache/vlm/prompts)"
    )
    parser.add_argument("--no-cache", action="store_true", help="always encode the prompts; write no cache")
    parser.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap replicates for CIs"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=_zeroshot)

    prompts = subparsers.add_parser("prompts", help="work with zero-shot prompt files")
    actions = prompts.add_subparsers(dest="prompts_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="validate prompt files and print classes × synonyms × templates",
        description="Exit status 1 if any file is invalid; each error names the file and the field.",
    )
    check.add_argument("paths", nargs="+", help="prompt files and/or folders of them (e.g. prompts/)")
    check.set_defaults(func=_prompts_check)

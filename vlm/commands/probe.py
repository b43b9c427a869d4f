"""Subcommand `vlm probe`: the supervised baseline (logistic regression on slide embeddings) beside zero-shot."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

_EPILOG = """examples:
  vlm probe --embeddings runs/slides.parquet --labels train_labels.csv --test-labels test_labels.csv --out runs/probe
  vlm probe --embeddings runs/slides.parquet --labels train_labels.csv --test-labels test_labels.csv --out runs/probe \\
      --shots 1 4 16 all --seeds 10 --zeroshot runs/zs/metrics.json
"""


def _probe(args: argparse.Namespace) -> int:
    from vlm.probe import run_probe

    report = run_probe(
        args.embeddings, args.labels, args.test_labels, args.out, shots=args.shots, seeds=args.seeds,
        zeroshot=args.zeroshot, label_column=args.label_column, n_boot=args.n_boot, seed=args.seed, level=args.level,
    )
    for entry in report["shots"]:
        if "runs" not in entry:
            print(f"{entry['shots']:>4}-shot: skipped ({entry['skipped']})")
            continue
        spread = entry["spread"]["balanced_accuracy"]
        first = entry["metrics"]["balanced_accuracy"]
        detail = (f"mean {spread['mean']:.3f} (min {spread['min']:.3f}, max {spread['max']:.3f}) over "
                  f"{entry['n_runs']} seeds" if entry["n_runs"] > 1
                  else f"{first['value']:.3f} [{first['ci_low']:.3f}, {first['ci_high']:.3f}]")
        print(f"{entry['shots']:>4}-shot balanced accuracy: {detail}")
    zeroshot = (report.get("zeroshot") or {}).get("metrics", {}).get("balanced_accuracy")
    if zeroshot:
        print(f"zero-shot balanced accuracy: {zeroshot['value']:.3f}")
    test_unit = "cases" if report["level"] == "case" else "slides"
    print(f"{report['n_train']} training slides / {report['n_test']} test {test_unit} -> {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from vlm.commands.options import add_bootstrap, add_embeddings, add_seed

    parser = subparsers.add_parser(
        "probe", help="supervised baseline: logistic regression on slide embeddings, by number of shots",
        description="Fits a logistic regression (regularisation chosen by cross-validation on the training "
        "labels only) on slide embeddings of the --labels slides, k per class (each k over --seeds draws) and "
        "all of them, and evaluates it on the --test-labels slides. Writes metrics.json (balanced accuracy, "
        "AUROC, weighted F1 with bootstrap CIs; spread over seeds), predictions.csv and probe.png.",
        epilog=_EPILOG,
    )
    add_embeddings(parser, "slide embeddings parquet from `vlm embed-slides`")
    parser.add_argument("--labels", required=True, help="slide_id,label table (CSV/TSV/Parquet/JSONL), training")
    parser.add_argument("--test-labels", required=True, help="slide_id,label table (CSV/TSV/Parquet/JSONL), held out")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--shots", nargs="+", default=["1", "2", "4", "8", "16", "all"],
                        help="training slides per class; 'all' = every training slide")
    parser.add_argument("--seeds", type=int, default=5, help="random draws of the training slides per shot count")
    parser.add_argument("--zeroshot", help="metrics.json of `vlm zeroshot` on the same test slides, drawn as a line")
    parser.add_argument("--label-column", default="label", help="label column of both label files")
    parser.add_argument(
        "--level", choices=("slide", "case"), default="slide",
        help="slide: each slide is a sample; case: for labels given per case (both label files need "
        "patient_id): shots count cases, CV folds and the train/test check keep a patient's slides together, "
        "and each test case is scored by the mean of its slides' logits (metrics per case)",
    )
    add_bootstrap(parser)
    add_seed(parser, "first seed of the draws; bootstrap seed")
    parser.set_defaults(func=_probe)

"""Subcommand `vlm demo`: the whole pipeline offline on a synthetic cohort (see `vlm.demo.run`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _demo(args: argparse.Namespace) -> int:
    from vlm.demo.run import DemoFailed, DemoSettings, run_demo

    settings = DemoSettings(out=Path(args.out), per_class=args.per_class, epochs=args.epochs, seed=args.seed,
                            progress=not args.no_progress)
    try:
        result = run_demo(settings)
    except DemoFailed as error:
        log.error("demo failed: %s", error)
        return 1
    balanced = result.zeroshot["metrics"]["balanced_accuracy"]
    print(f"zero-shot balanced accuracy on held-out synthetic slides: {balanced['value']:.3f} "
          f"(95% CI {balanced['ci_low']:.3f}-{balanced['ci_high']:.3f}); total {sum(result.timings.values()):.0f} s")
    print(f"summary: {Path(args.out) / 'summary.md'}")
    print(f"your own slide through the demo's encoders and model: {Path(args.out) / 'new_slide.sh'} SLIDE OUT")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from vlm.commands.options import add_progress, add_seed

    demo = subparsers.add_parser(
        "demo", help="run every stage offline on a synthetic cohort (a few minutes, CPU)",
        description="Draws a synthetic cohort, tiles and embeds it with random-weight encoders, trains the "
        "alignment with a real pretrained text tower, and evaluates zero-shot, search and a supervised "
        "baseline on held-out slides. Writes <out>/summary.md and a script <out>/new_slide.sh that pushes a "
        "slide of your own through the demo's encoders and model.",
    )
    demo.add_argument("--out", default="demo_out", help="output folder")
    demo.add_argument("--per-class", type=int, default=12, help="synthetic slides per class")
    demo.add_argument("--epochs", type=int, default=40, help="alignment training epochs")
    add_seed(demo, "seed of the synthetic cohort, the encoders and the training")
    add_progress(demo)
    demo.set_defaults(func=_demo)

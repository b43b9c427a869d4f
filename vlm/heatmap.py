"""`vlm heatmap` as a stage: check the inputs, compute each slide's maps and their faithfulness, write them.

The maths (tile shares, region occlusion, deletion/insertion faithfulness) lives beside the model in
`vlm.model.attribution`, shared with `vlm zeroshot --heatmaps` and `vlm serve`. Per slide this writes
`<slide_id>.png` (the maps, each titled with its faithfulness), `.geojson` (QuPath tiles), `.csv` (tile scores)
and `.json` (slide scores and every map's `faithfulness`), and one `summary.csv` for the run. A map that is no
better than random tile orders says so on its PNG and in the log.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vlm.errors import InputError, MissingInputError, UsageError
from vlm.io import make_output_folder
from vlm.model.attribution import RANDOM_SPREADS, SlideHeat, slide_heat, slide_tower
from vlm.model.clip import SlideTextModel

if TYPE_CHECKING:
    from vlm.batch import BatchReport

log = logging.getLogger(__name__)

HEATMAP_OUTPUTS = (".png", ".geojson", ".csv", ".json")
THUMBNAIL_SIZE = 1024  # longest side of the PNG's slide thumbnail, px
TARGETS: tuple[str, ...] = ("contrast", "class")  # task maps: class against the others (default), class alone
RULE = (
    f"better_than_random: insertion_auc - deletion_auc exceeds the mean of the same gap over random tile orders "
    f"by more than {RANDOM_SPREADS:g} standard deviations (ddof=1) of the random gaps"
)


def to_geojson(heat: SlideHeat) -> dict:
    """A QuPath-importable FeatureCollection: one tile Polygon per tile (level-0 px), a measurement per query."""
    size = heat.tile_size
    features = []
    for i, (x, y) in enumerate(heat.coords.tolist()):
        ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        measurements = {name: float(v) for name, v in zip(heat.measurement_names, heat.scores[i], strict=True)}
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"vlm:{heat.slide_id}:{x},{y}")),  # QuPath reads UUID ids
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "tile", "name": f"tile {x},{y}", "measurements": measurements},
        })
    return {"type": "FeatureCollection", "features": features,
            "properties": {"slide_id": heat.slide_id, "queries": heat.queries,
                           "slide_scores": [float(s) for s in heat.slide_scores]}}


def _faithfulness_line(heat: SlideHeat, column: int) -> str:
    """One line under a map: its deletion / insertion areas against random orders, and the verdict."""
    if heat.faithfulness is None:
        return "faithfulness not measured"
    f = heat.faithfulness[column]
    verdict = "better than random order" if f.better_than_random else "NO BETTER THAN RANDOM: do not read this map"
    return (f"deletion {f.deletion_auc:.3f} (random {f.random_deletion_auc_mean:.3f}±{f.random_deletion_auc_std:.3f}), "
            f"insertion {f.insertion_auc:.3f} (random {f.random_insertion_auc_mean:.3f}±"
            f"{f.random_insertion_auc_std:.3f}): {verdict}")


def _figure_png(heat: SlideHeat, slide_path: Path) -> bytes:
    """Thumbnail with each query's heat overlaid, a colour bar, the query and the map's faithfulness; PNG bytes.

    Drawn on a `matplotlib.figure.Figure` with the Agg canvas: no pyplot, so a notebook's backend is untouched."""
    import io
    import textwrap

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from vlm.plots import heat_grid, heat_rgba
    from vlm.wsi.slide import open_slide

    with open_slide(slide_path) as slide:
        dimensions = slide.dimensions
        downsample = max(dimensions) / THUMBNAIL_SIZE
        level = slide.best_level_for_downsample(downsample)
        thumbnail = slide.read_level_rgb(level)
    extent = (0, dimensions[0], dimensions[1], 0)
    count = len(heat.queries)
    figure = Figure(figsize=(5.5 * count, 5 * dimensions[1] / dimensions[0] + 1.2))
    FigureCanvasAgg(figure)
    for column, axis in enumerate(np.atleast_1d(figure.subplots(1, count))):
        grid = heat_grid(heat, column, dimensions, downsample)
        valid = grid[np.isfinite(grid)]
        axis.imshow(thumbnail, extent=extent)
        axis.imshow(heat_rgba(grid), extent=extent, interpolation="nearest")
        low, high = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 1.0)
        mappable = ScalarMappable(Normalize(low, high), cmap=colormaps["inferno"])
        label = "tile score" if heat.method == "share" else "score drop without the tile's region"
        figure.colorbar(mappable, ax=axis, fraction=0.046, pad=0.02, label=label)
        title = textwrap.fill(f'"{heat.queries[column]}"', 48)
        axis.set_title(f"{heat.slide_id}: {title}\nslide score {heat.slide_scores[column]:.3f} ({heat.method})",
                       fontsize=9)
        passed = heat.faithfulness is None or heat.faithfulness[column].better_than_random
        axis.text(0.5, -0.02, textwrap.fill(_faithfulness_line(heat, column), 60), transform=axis.transAxes,
                  ha="center", va="top", fontsize=7, color="black" if passed else "darkred",
                  fontweight="normal" if passed else "bold")
        axis.axis("off")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def heat_record(heat: SlideHeat) -> dict:
    """`<slide_id>.json`: the slide's scores and each map's `faithfulness` against random tile orders."""
    maps = []
    for column, (query, name) in enumerate(zip(heat.queries, heat.measurement_names, strict=True)):
        measured = heat.faithfulness[column].to_dict() if heat.faithfulness is not None else None
        maps.append({"query": query, "measurement": name, "slide_score": float(heat.slide_scores[column]),
                     "faithfulness": measured})
    return {"slide_id": heat.slide_id, "method": heat.method, "n_tiles": len(heat.coords), "rule": RULE,
            "maps": maps}


def summary_rows(heat: SlideHeat) -> list[dict]:
    """One `summary.csv` row per map: slide, query, method, slide score and the faithfulness numbers."""
    rows = []
    for entry in heat_record(heat)["maps"]:
        measured = {k: v for k, v in (entry["faithfulness"] or {}).items() if not k.endswith("_curve")}
        rows.append({"slide_id": heat.slide_id, "query": entry["query"], "method": heat.method,
                     "slide_score": entry["slide_score"], **measured})
    return rows


def write_heatmap(heat: SlideHeat, slide_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[Path]:
    """Write `<out>/<slide_id>.png|.geojson|.csv|.json`; everything is computed before the first file is written."""
    import pandas as pd

    from vlm.io import atomic_path

    out = Path(out)
    png = _figure_png(heat, Path(slide_path))
    geojson = json.dumps(to_geojson(heat)).encode()
    table = pd.DataFrame({"x": heat.coords[:, 0], "y": heat.coords[:, 1], "size": heat.tile_size})
    for name, column in zip(heat.measurement_names, heat.scores.T, strict=True):
        table[name] = column
    csv = table.to_csv(index=False, float_format="%.6g").encode()
    record = json.dumps(heat_record(heat), indent=1).encode()
    make_output_folder(out)
    paths = []
    for suffix, data in zip(HEATMAP_OUTPUTS, (png, geojson, csv, record), strict=True):
        path = out / f"{heat.slide_id}{suffix}"
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        paths.append(path)
    return paths


def slide_file_for(feature_path: Path, slides: Sequence[str | os.PathLike[str]]) -> Path:
    """The slide file of a feature file: one of `slides` (files or folders) with its slide id, else the
    `slide_path` recorded in the feature file."""
    from vlm.formats.features import read_tile_grid
    from vlm.io import slide_id_from_path

    slide_id = slide_id_from_path(feature_path)
    for entry in map(Path, slides):
        candidates = sorted(p for p in entry.iterdir() if p.is_file()) if entry.is_dir() else [entry]
        for candidate in candidates:
            if candidate.is_file() and slide_id_from_path(candidate) == slide_id:
                return candidate
    recorded = read_tile_grid(feature_path).slide_path
    given = [Path(s) for s in slides if Path(s).is_file()]
    if len(given) == 1 and len(given) == len(slides):  # the user named one slide file for these features
        if recorded and Path(recorded).is_file() and Path(recorded).samefile(given[0]):
            return given[0]
        raise InputError(
            f"{feature_path} (slide {slide_id!r}, cut from {recorded or 'an unrecorded file'}) and `slide` "
            f"{given[0]} (slide {slide_id_from_path(given[0])!r}): the features are not of this slide; pass the "
            "slide they were cut from"
        )
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    raise MissingInputError(
        f"{feature_path}: no slide file for slide {slide_id!r} in `slide` {[str(s) for s in slides]} "
        f"(and the recorded slide_path {recorded!r} does not exist); pass it with `slide`"
    )


def check_tiles_inside(feature_path: Path, slide_path: Path, coords: np.ndarray) -> None:
    """Refuse a slide that the feature file's tiles do not fit: a tile whose corner lies outside the image
    means the features were cut from another slide (or another scan of it)."""
    from vlm.wsi.slide import open_slide

    with open_slide(slide_path) as slide:
        width, height = slide.dimensions
    outside = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= width) | (coords[:, 1] >= height)
    if outside.any():
        raise InputError(
            f"{feature_path} and {slide_path}: {int(outside.sum())} of {len(coords)} tiles lie outside the slide's "
            f"{width} x {height} px image; these features were not cut from this slide. Pass the slide they "
            "were made from (`slide`), or re-run vlm tile / embed-tiles on this one"
        )


def run_heatmaps(
    model: SlideTextModel,
    feature_paths: Sequence[str | os.PathLike[str]],
    slides: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    queries: Sequence[str] | None = None,
    per_slide: dict[str, tuple[list[str], torch.Tensor]] | None = None,
    slide_checkpoint: str | os.PathLike[str] | None = None,
    mpp: float | None = None,
    method: str = "share",
    block: int | str = "auto",
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> BatchReport:
    """Heatmaps of each feature file for `queries`, or for each slide's own (names, texts) in `per_slide`
    (zero-shot: the predicted class against the others), by `method` ("share" or "occlusion"), each with its
    faithfulness. A failing slide is recorded in `<out>/failures.csv` and the batch goes on; `<out>/summary.csv`
    holds one row per map of this run."""
    from vlm.batch import Batch
    from vlm.device import autocast_dtype, resolve_device
    from vlm.encoders.slide_inputs import check_tile_encoders
    from vlm.formats.features import read_tile_grid
    from vlm.io import atomic_path, check_output_folder, claim_output_folder, slide_id_from_path
    from vlm.model.attribution import METHODS

    blank = [q for q in queries or [] if not q.strip()]
    if blank or (queries is None) == (per_slide is None):
        raise InputError("give non-empty query texts (`query` TEXT), e.g. a phrase of a report")
    repeated = sorted({q for q in queries or [] if list(queries or []).count(q) > 1})
    if repeated:
        raise UsageError(f"query {repeated[0]!r} is given more than once; give each query once")
    if method not in METHODS:
        raise UsageError(f"unknown heatmap method {method!r}; choose one of {', '.join(METHODS)}")
    check_output_folder(out, "heatmaps")  # before any work: a folder of the user's files is refused
    check_tile_encoders(feature_paths, model.config.slide_encoder, source=model.config.slide_source)
    device = resolve_device(device)
    autocast_dtype(device, precision)  # an impossible precision fails here, before any slide
    model = model.to(device).eval()
    encoder = slide_tower(model, slide_checkpoint).to(device)
    texts = model.encode_text(list(queries), device="cpu") if queries else None
    rows: list[dict] = []

    def one(feature_path: Path) -> None:
        if per_slide is not None:
            names, vectors = per_slide[slide_id_from_path(feature_path)]
        else:
            names, vectors = list(queries or []), texts
        slide_path = slide_file_for(feature_path, slides)
        check_tiles_inside(feature_path, slide_path, read_tile_grid(feature_path).coords)
        heat = slide_heat(model, encoder, feature_path, names, vectors, mpp=mpp, method=method, block=block,
                          precision=precision)
        write_heatmap(heat, slide_path, out)
        for column, measured in enumerate(heat.faithfulness or []):
            if not measured.better_than_random:
                log.warning("%s: the %s map of %r is no better than random tile order (gap %.4f vs random "
                            "%.4f ± %.4f): it does not show what drives the score", heat.slide_id, method,
                            heat.queries[column], measured.gap, measured.random_gap_mean, measured.random_gap_std)
        rows.extend(summary_rows(heat))

    # every slide is redone (is_done=None): the outputs do not record the model or queries they were made for
    batch = Batch(list(map(Path, feature_paths)), key=slide_id_from_path, is_done=None, folder=out, desc="heatmaps",
                  progress=False)
    with claim_output_folder(out, "heatmaps"):
        report = batch.run(one)
        if rows:
            import pandas as pd

            with atomic_path(Path(out) / "summary.csv") as tmp:
                pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")
        return report


def task_targets(
    model: SlideTextModel,
    task: str | os.PathLike[str] | None,
    classes: Sequence[str] | None,
    target: str = "contrast",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[str], list[str], torch.Tensor]:
    """A prompt task's classes, map names and text vectors [C, D]: each class's prototype (its prompt
    ensemble, as zero-shot scores it) against the mean of the other classes' (`target="contrast"`, the
    quantity the prediction compares), or alone (`"class"`)."""
    from vlm.model.attribution import contrast_texts
    from vlm.model.zeroshot import ZeroShotClassifier
    from vlm.prompts import load_prompt_task, task_from_classes

    if target not in TARGETS:
        raise UsageError(f"unknown heatmap target {target!r}; choose one of {', '.join(TARGETS)}")
    prompt_task = load_prompt_task(task) if task is not None else task_from_classes(classes)
    classifier = ZeroShotClassifier(model, prompt_task, cache_dir=cache_dir)
    names = list(classifier.classes)
    if target == "contrast":
        vectors = contrast_texts(classifier.prototypes.detach().float().cpu())
        labels = [f"{name} vs other classes (prompts of {prompt_task.name})" for name in names]
    else:
        vectors = classifier.prototypes.detach().float().cpu()
        labels = [f"{name} (prompts of {prompt_task.name})" for name in names]
    return names, labels, vectors


def zeroshot_heatmaps(
    model: str | os.PathLike[str],
    predictions: str | os.PathLike[str],
    task: str | os.PathLike[str] | None,
    classes: Sequence[str] | None,
    features: str | os.PathLike[str],
    slides: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    slide_checkpoint: str | os.PathLike[str] | None = None,
    target: str = "contrast",
    method: str = "share",
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> BatchReport:
    """`vlm zeroshot --heatmaps`: each scored slide's map of its predicted class, by default against the
    task's other classes (`target="contrast"`), or the class's prototype alone (`"class"`). `features` is a
    folder of .h5 files."""
    from vlm.formats.features import feature_files
    from vlm.formats.tables import read_table

    loaded = SlideTextModel.from_pretrained(model)
    names, labels, vectors = task_targets(loaded, task, classes, target, cache_dir)
    table = read_table(predictions, required=("slide_id", "predicted"), what="predictions", all_text=True)
    files = {p.stem: p for p in feature_files(features)}
    missing = sorted(set(table["slide_id"]) - set(files))
    if missing:
        raise MissingInputError(f"{features}: no tile features for scored slide(s) {missing[:5]}; pass their folder")
    per_slide = {}
    for slide_id, predicted in zip(table["slide_id"], table["predicted"], strict=True):
        row = names.index(predicted)
        per_slide[slide_id] = ([f"{labels[row]}, predicted"], vectors[row : row + 1])
    return run_heatmaps(loaded, [files[s] for s in per_slide], slides, out, per_slide=per_slide,
                        slide_checkpoint=slide_checkpoint, method=method, device=device,
                        precision=precision)

"""Text -> tile heatmaps: which tiles of a slide make it match a phrase, from the same model as the slide score.

Decomposition (exact, not an approximation of the slide score). With mean pooling the slide encoder returns
`e = LN(m)`, `m = mean_i t_i`, where `t_i` are its contextual tile tokens (after the encoder's final
`layer_norm`) and `LN` is its output LayerNorm. LayerNorm's centring is linear and its scale `s` is one
number per slide, so `e = mean_i e_i` with `e_i = gamma * (t_i - mean(t_i)) / s + beta`. The projection `P`
(linear in every model `vlm train` makes; an MLP is linearised at `e`) maps each tile's share into the joint
space, `z_i = P(e) + J_P(e) (e_i - e)`, and a tile's share of the score for a text `u` is
`share_i(x) = <z_i, u> / |P(e)|`; the shares of a slide average to its cosine score `S(x)`.

A share also holds what the tile's position alone gives it: every token is `W f_i + pos_i`, and the fixed
positional rows are as large as the content (on the demo, larger), so raw shares paint the slide's layout.
The tile score therefore subtracts a counterfactual: the same slide, same coordinates, every tile carrying
the slide's mean feature `x_bar`, decomposed the same way:

    score_i = S(x_bar) + share_i(x) - share_i(x_bar)

Its mean over tiles is `S(x_bar) + S(x) - S(x_bar) = S(x)`, the slide's score, exactly, so pooled heat ranks
slides as search and zero-shot do; a tile's departure from that mean is what its content adds beyond the
slide's average content at the same place (a slide whose tiles all carry one feature gets flat heat). Tile
scores are relative contributions, not probabilities: they may fall outside [-1, 1].

A model trained on cached slide embeddings holds no slide encoder; it records the one that made the
embeddings (`SlideTextConfig.slide_source`: preset, config, pool, checkpoint path, file and weights hashes)
and `slide_tower` rebuilds it from there (or from `--slide-checkpoint`), refusing weights whose hash differs.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vlm.io import make_output_folder
from vlm.model.clip import SlideTextModel

if TYPE_CHECKING:
    from vlm.batch import BatchReport

log = logging.getLogger(__name__)

HEATMAP_OUTPUTS = (".png", ".geojson", ".csv")
THUMBNAIL_SIZE = 1024  # longest side of the PNG's slide thumbnail, px


@dataclass
class SlideHeat:
    """Tile scores of one slide for some queries."""

    slide_id: str
    queries: list[str]
    coords: np.ndarray  # [N, 2] level-0 (x, y) of each tile's top-left corner
    tile_size: int  # level-0 px
    scores: np.ndarray  # [N, Q] tile scores; their mean over tiles = slide_scores
    slide_scores: np.ndarray  # [Q] the slide's cosine score per query

    @property
    def measurement_names(self) -> list[str]:
        """`score` for one query; `score: <query>` for several (QuPath measurement / CSV column names)."""
        return ["score"] if len(self.queries) == 1 else [f"score: {q}" for q in self.queries]


def slide_tower(model: SlideTextModel, checkpoint: str | os.PathLike[str] | None = None) -> torch.nn.Module:
    """The slide encoder behind `model`'s slide scores, in eval mode.

    A fine-tuned model holds it; a model trained on cached embeddings is rebuilt from its recorded
    `slide_source` with the recorded checkpoint or `checkpoint`. Refused: no record, a checkpoint whose
    weights hash differs from the record, a pooling other than mean (no tile decomposition).
    """
    from vlm.encoders.slide import SLIDE_ENCODER_PRESETS, create_slide_encoder
    from vlm.io import file_sha256
    from vlm.weights import weights_digest

    if model.slide_encoder is not None:
        if checkpoint is not None:
            raise ValueError("this model was fine-tuned with its own slide encoder; --slide-checkpoint does not apply")
        _check_pool(model.config.pool)
        return model.slide_encoder.eval()
    source = model.config.slide_source
    if not source or "config" not in source:
        raise ValueError(
            "this model does not record which slide encoder made its slide embeddings (trained before vlm "
            "recorded it, or on embeddings from another tool); retrain it with `vlm train --slide-embeddings` "
            "on a parquet from this vlm's `vlm embed-slides`"
        )
    _check_pool(str(source.get("pool")))
    path = checkpoint if checkpoint is not None else source.get("checkpoint")
    if path is None:
        raise ValueError(
            "the slide embeddings this model was trained on were made by a slide encoder saved to no file "
            f"(weights sha256 {source.get('weights_sha256')}); pass its weights with --slide-checkpoint FILE"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: slide-encoder checkpoint not found; pass the file with --slide-checkpoint")
    preset = source.get("encoder") if source.get("encoder") in SLIDE_ENCODER_PRESETS else "gigapath"
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in source["config"].items()}
    encoder = create_slide_encoder(preset, checkpoint=path, **overrides)
    recorded = source.get("weights_sha256")
    if recorded is not None:
        found = weights_digest(encoder)
        if found != recorded:
            raise ValueError(
                f"{path}: its weights (sha256 {found[:12]}…) are not the slide encoder that made this model's "
                f"slide embeddings (sha256 {recorded[:12]}…); pass that encoder's checkpoint"
            )
    elif source.get("checkpoint_sha256") and file_sha256(path) != source["checkpoint_sha256"]:
        raise ValueError(f"{path}: not the checkpoint (sha256 {source['checkpoint_sha256'][:12]}…) the model records")
    else:
        log.warning("no weights hash recorded for the slide encoder; cannot verify %s", path)
    return encoder.eval()


def _check_pool(pool: str) -> None:
    if pool != "mean":
        raise ValueError(
            f"tile heatmaps decompose the mean-pooled slide embedding; this model's slides use pool={pool!r}"
        )


@torch.no_grad()
def tile_scores(
    model: SlideTextModel,
    encoder: torch.nn.Module,
    features: np.ndarray,
    coords: np.ndarray,
    texts: torch.Tensor,
) -> tuple[np.ndarray, np.ndarray]:
    """Tile features [N, in_dim] + 0.5-mpp coords [N, 2] + L2-normalised texts [Q, D] -> tile scores [N, Q]
    and slide scores [Q]: `S(x_bar) + share_i(x) - share_i(x_bar)` (module docstring); their mean over tiles
    equals the slide score."""
    features = np.asarray(features, dtype=np.float32)
    shares, slide = _shares(model, encoder, features, coords, texts)
    baseline = np.broadcast_to(features.mean(0, dtype=np.float64).astype(np.float32), features.shape)
    baseline_shares, baseline_slide = _shares(model, encoder, baseline, coords, texts)
    return baseline_slide[None] + shares - baseline_shares, slide


def _shares(
    model: SlideTextModel, encoder: torch.nn.Module, features: np.ndarray, coords: np.ndarray, texts: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Each tile's share `share_i` [N, Q] of the slide's cosine score [Q]; the shares average to it."""
    device = next(encoder.parameters()).device
    captured: list[torch.Tensor] = []
    handle = encoder.encoder.layer_norm.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        x = torch.as_tensor(np.ascontiguousarray(features), dtype=torch.float32, device=device)[None]
        c = torch.as_tensor(coords, dtype=torch.float64, device=device)[None]
        pooled = encoder(x, c, pool="mean")[0].float()  # [E]
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the slide encoder's final layer_norm ran {len(captured)} times; expected once")
    tokens = captured[0][0, 1:].float()  # [N, E] contextual tile tokens (CLS dropped)
    norm = encoder.norm
    mean = tokens.mean(0)
    scale = torch.sqrt(mean.var(unbiased=False) + norm.eps)
    parts = norm.weight.float() * (tokens - tokens.mean(-1, keepdim=True)) / scale + norm.bias.float()  # [N, E]
    if not torch.allclose(parts.mean(0), pooled, atol=1e-4, rtol=1e-4):
        raise RuntimeError("tile shares do not add up to the slide embedding; the slide encoder's pooling changed")
    projection = model.slide_proj.float()
    pooled = pooled.to(next(projection.parameters()).device)
    projected = projection(pooled)  # [P]
    with torch.enable_grad():
        jacobian = torch.autograd.functional.jacobian(projection, pooled)  # [P, E]
    shares = projected[None] + (parts.to(pooled.device) - pooled[None]) @ jacobian.T  # [N, P]
    texts = texts.to(pooled.device, torch.float32)
    length = projected.norm()
    scores = shares @ texts.T / length  # [N, Q]
    slide = projected @ texts.T / length  # [Q]
    return scores.cpu().numpy(), slide.cpu().numpy()


def slide_heat(
    model: SlideTextModel,
    encoder: torch.nn.Module,
    feature_path: str | os.PathLike[str],
    queries: Sequence[str],
    texts: torch.Tensor | None = None,
    mpp: float | None = None,
) -> SlideHeat:
    """Tile scores of one feature file for `queries` (texts [Q, D] given: e.g. zero-shot class prototypes)."""
    from vlm.encoders.slide_inputs import prepare_slide_inputs
    from vlm.formats.features import read_features
    from vlm.io import slide_id_from_path

    if texts is None:
        texts = model.encode_text(list(queries), device="cpu")
    config = encoder.config
    slide_id = slide_id_from_path(feature_path)
    tiles = read_features(feature_path, mpp=mpp)  # read once: the encoder inputs and the level-0 tile corners
    grid = tiles.grid
    inputs = prepare_slide_inputs(tiles.features, grid.coords, grid.mpp, grid.tile_size_level0, slide_id,
                                  str(feature_path), config.in_dim, config.tile_size, config.grid_size)  # fmt: skip
    scores, slide = tile_scores(model, encoder, inputs.features, inputs.coords, texts)
    return SlideHeat(slide_id, list(queries), grid.coords, grid.tile_size_level0, scores, slide)


def heat_grid(heat: SlideHeat, column: int, dimensions: tuple[int, int], downsample: float) -> np.ndarray:
    """Scores of query `column` painted on a [H, W] float grid at `downsample` (NaN where no tile)."""
    width, height = (max(1, int(np.ceil(d / downsample))) for d in dimensions)
    grid = np.full((height, width), np.nan, dtype=np.float32)
    size = max(1, int(round(heat.tile_size / downsample)))
    for (x, y), value in zip(heat.coords, heat.scores[:, column], strict=True):
        col, row = int(x / downsample), int(y / downsample)
        grid[row : row + size, col : col + size] = value
    return grid


def heat_rgba(grid: np.ndarray, alpha: float = 0.55, cmap: str = "inferno") -> np.ndarray:
    """A heat grid as RGBA uint8 (transparent where NaN), scaled to its own min–max."""
    from matplotlib import colormaps

    valid = np.isfinite(grid)
    low, high = (float(grid[valid].min()), float(grid[valid].max())) if valid.any() else (0.0, 1.0)
    scaled = np.where(valid, (grid - low) / (high - low if high > low else 1.0), 0.0)
    rgba = (colormaps[cmap](scaled) * 255).astype(np.uint8)
    rgba[..., 3] = np.where(valid, int(alpha * 255), 0)
    return rgba


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
        })  # fmt: skip
    return {"type": "FeatureCollection", "features": features,
            "properties": {"slide_id": heat.slide_id, "queries": heat.queries,
                           "slide_scores": [float(s) for s in heat.slide_scores]}}  # fmt: skip


def _figure_png(heat: SlideHeat, slide_path: Path) -> bytes:
    """Thumbnail with each query's heat overlaid, a colour bar and the query as the title; PNG bytes."""
    import io
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    from vlm.wsi.slide import open_slide

    with open_slide(slide_path) as slide:
        dimensions = slide.dimensions
        downsample = max(dimensions) / THUMBNAIL_SIZE
        level = slide.best_level_for_downsample(downsample)
        thumbnail = slide.read_level_rgb(level)
    extent = (0, dimensions[0], dimensions[1], 0)
    count = len(heat.queries)
    figure, axes = plt.subplots(1, count, figsize=(5.5 * count, 5 * dimensions[1] / dimensions[0] + 0.8))
    for column, axis in enumerate(np.atleast_1d(axes)):
        grid = heat_grid(heat, column, dimensions, downsample)
        valid = grid[np.isfinite(grid)]
        axis.imshow(thumbnail, extent=extent)
        axis.imshow(heat_rgba(grid), extent=extent, interpolation="nearest")
        mappable = plt.cm.ScalarMappable(Normalize(float(valid.min()), float(valid.max())), cmap="inferno")
        figure.colorbar(mappable, ax=axis, fraction=0.046, pad=0.02, label="tile score")
        title = textwrap.fill(f'"{heat.queries[column]}"', 48)
        axis.set_title(f"{heat.slide_id}: {title}\nslide score {heat.slide_scores[column]:.3f}", fontsize=9)
        axis.axis("off")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def write_heatmap(heat: SlideHeat, slide_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[Path]:
    """Write `<out>/<slide_id>.png|.geojson|.csv`; everything is computed before the first file is written."""
    import pandas as pd

    from vlm.io import atomic_path

    out = Path(out)
    png = _figure_png(heat, Path(slide_path))
    geojson = json.dumps(to_geojson(heat)).encode()
    table = pd.DataFrame({"x": heat.coords[:, 0], "y": heat.coords[:, 1], "size": heat.tile_size})
    for name, column in zip(heat.measurement_names, heat.scores.T, strict=True):
        table[name] = column
    csv = table.to_csv(index=False, float_format="%.6g").encode()
    make_output_folder(out)
    paths = []
    for suffix, data in zip(HEATMAP_OUTPUTS, (png, geojson, csv), strict=True):
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
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    raise FileNotFoundError(
        f"{feature_path}: no slide file for slide {slide_id!r} in --slide {[str(s) for s in slides]} "
        f"(and the recorded slide_path {recorded!r} does not exist); pass it with --slide"
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
) -> BatchReport:
    """Heatmaps of each feature file for `queries`, or for each slide's own (names, texts) in `per_slide`
    (zero-shot: the predicted class). A failing slide is recorded in `<out>/failures.csv` and the batch goes on."""
    from vlm.batch import Batch
    from vlm.encoders.slide_inputs import check_tile_encoders
    from vlm.io import check_output_folder, claim_output_folder, slide_id_from_path

    blank = [q for q in queries or [] if not q.strip()]
    if blank or (queries is None) == (per_slide is None):
        raise ValueError("give non-empty query texts (--query TEXT), e.g. a phrase of a report")
    check_output_folder(out, "heatmaps")  # before any work: a folder of the user's files is refused
    check_tile_encoders(feature_paths, model.config.slide_encoder, source=model.config.slide_source)
    encoder = slide_tower(model, slide_checkpoint)
    texts = model.encode_text(list(queries), device="cpu") if queries else None

    def one(feature_path: Path) -> None:
        if per_slide is not None:
            names, vectors = per_slide[slide_id_from_path(feature_path)]
        else:
            names, vectors = list(queries or []), texts
        heat = slide_heat(model, encoder, feature_path, names, vectors, mpp=mpp)
        write_heatmap(heat, slide_file_for(feature_path, slides), out)

    # every slide is redone (is_done=None): the outputs do not record the model or queries they were made for
    batch = Batch(list(map(Path, feature_paths)), key=slide_id_from_path, is_done=None, folder=out, desc="heatmaps",
                  progress=False)  # fmt: skip
    with claim_output_folder(out, "heatmaps"):
        return batch.run(one)


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
) -> BatchReport:
    """`vlm zeroshot --heatmaps`: each scored slide's heat for its predicted class, whose prototype (the
    class's prompt ensemble, as zero-shot scored it) is the query. `features` is a folder of .h5 files."""
    from vlm.formats.features import feature_files
    from vlm.formats.tables import read_table
    from vlm.model.zeroshot import ZeroShotClassifier
    from vlm.prompts import load_prompt_task, task_from_classes

    loaded = SlideTextModel.from_pretrained(model)
    prompt_task = load_prompt_task(task) if task is not None else task_from_classes(classes)
    classifier = ZeroShotClassifier(loaded, prompt_task, cache_dir=cache_dir)
    table = read_table(predictions, required=("slide_id", "predicted"), what="predictions", all_text=True)
    files = {p.stem: p for p in feature_files(features)}
    missing = sorted(set(table["slide_id"]) - set(files))
    if missing:
        raise FileNotFoundError(f"{features}: no tile features for scored slide(s) {missing[:5]}; pass their folder")
    per_slide = {}
    for slide_id, predicted in zip(table["slide_id"], table["predicted"], strict=True):
        row = list(classifier.classes).index(predicted)
        per_slide[slide_id] = ([f"{predicted} (predicted; prompts of {prompt_task.name})"],
                               classifier.prototypes[row : row + 1])  # fmt: skip
    return run_heatmaps(loaded, [files[s] for s in per_slide], slides, out, per_slide=per_slide,
                        slide_checkpoint=slide_checkpoint)  # fmt: skip

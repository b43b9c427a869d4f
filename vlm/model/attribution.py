"""Attribution maths beside the model: which tiles of a slide make it match a text, and how far to trust the map.

Shared by `vlm heatmap` (`vlm.heatmap`), `vlm zeroshot --heatmaps` and `vlm serve`; nothing here writes files.

Linear tile shares (`method="share"`, the default).

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

Region occlusion (`method="occlusion"`). Tiles are grouped into square blocks of the grid; each block is
removed from the slide (its tiles left out of the encoder's input, as if that tissue were absent), the rest
re-encoded, and every tile of the block scores `S(x) - S(x without its block)`: how much the slide's score
falls without that region. All blocks go through the encoder in a few padded batches.

Faithfulness (`faithfulness`), measured on every map. Deletion: remove the map's hottest tiles first, in
`steps` equal fractions, re-encode and record the target's score; insertion: the slide made of the map's
hottest tiles only, growing in the same fractions. A map that finds what drives the score makes the deletion
curve fall early and the insertion curve rise early. The areas (means over the steps) are compared with the
same curves in `random_orders` random tile orders: the map is `better_than_random` when its gap
`insertion_auc - deletion_auc` exceeds the random orders' mean gap by more than `RANDOM_SPREADS` standard
deviations (ddof=1) of their gaps. With 8 random orders a map whose order is itself random passes about 1
time in 20 (`(gap - mean) / (std * sqrt(1 + 1/8))` follows a t distribution with 7 degrees of freedom);
the gap, not deletion or insertion alone, because removing tissue changes a slide in two ways (what is
gone, and how the remainder is arranged) and the two curves err in opposite directions.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlm.errors import InputError, MissingInputError, UsageError
from vlm.model.clip import SlideTextModel

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("share", "occlusion")  # tile attributions: linear shares, region occlusion
FAITHFULNESS_STEPS = 10  # points of each deletion / insertion curve
RANDOM_ORDERS = 8  # random tile orders the map's curves are compared with
RANDOM_SPREADS = 2.0  # better_than_random: gap above the random mean by more than this many std
OCCLUSION_BLOCKS = 64  # about this many blocks per slide when the block size is "auto"
TOKENS_PER_PASS = 65536  # tiles per padded encoder batch (re-encodings of faithfulness and occlusion)


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
            raise InputError("this model was fine-tuned with its own slide encoder; `slide_checkpoint` does not apply")
        _check_pool(model.config.pool)
        return model.slide_encoder.eval()
    source = model.config.slide_source
    if not source or "config" not in source:
        raise InputError(
            "this model does not record which slide encoder made its slide embeddings (trained before vlm "
            "recorded it, or on embeddings from another tool); retrain it with `vlm train --embeddings` "
            "on a parquet from this vlm's `vlm embed-slides`"
        )
    _check_pool(str(source.get("pool")))
    path = checkpoint if checkpoint is not None else source.get("checkpoint")
    if path is None:
        raise InputError(
            "the slide embeddings this model was trained on were made by a slide encoder saved to no file "
            f"(weights sha256 {source.get('weights_sha256')}); pass its weights with `slide_checkpoint` FILE"
        )
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: slide-encoder checkpoint not found; pass the file with `slide_checkpoint`")
    preset = source.get("encoder") if source.get("encoder") in SLIDE_ENCODER_PRESETS else "gigapath"
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in source["config"].items()}
    encoder = create_slide_encoder(preset, checkpoint=path, **overrides)
    recorded = source.get("weights_sha256")
    if recorded is not None:
        found = weights_digest(encoder)
        if found != recorded:
            raise InputError(
                f"{path}: its weights (sha256 {found[:12]}…) are not the slide encoder that made this model's "
                f"slide embeddings (sha256 {recorded[:12]}…); pass that encoder's checkpoint"
            )
    elif source.get("checkpoint_sha256") and file_sha256(path) != source["checkpoint_sha256"]:
        raise InputError(f"{path}: not the checkpoint (sha256 {source['checkpoint_sha256'][:12]}…) the model records")
    else:
        log.warning("no weights hash recorded for the slide encoder; cannot verify %s", path)
    return encoder.eval()


def _check_pool(pool: str) -> None:
    if pool != "mean":
        raise UsageError(
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


def contrast_texts(prototypes: torch.Tensor) -> torch.Tensor:
    """Class prototypes [C, D] -> contrast vectors [C, D]: row c is `u_c - mean_{j != c} u_j`.

    Scores are linear in the text vector, so a tile's score against row c is its class-c score minus its mean
    score for the other classes: what the prediction compares (for two classes, the log-odds divided by the
    logit scale), with the part common to every class (a region's offset, the slide's layout) cancelled.
    """
    count = len(prototypes)
    if count < 2:
        raise UsageError("a contrastive map needs a task with at least two classes; map one phrase instead")
    total = prototypes.sum(0, keepdim=True)
    return prototypes - (total - prototypes) / (count - 1)


@torch.no_grad()
def subset_scores(
    model: SlideTextModel,
    encoder: torch.nn.Module,
    features: np.ndarray,
    coords: np.ndarray,
    subsets: Sequence[np.ndarray],
    texts: torch.Tensor,
    precision: str = "auto",
    tokens_per_pass: int = TOKENS_PER_PASS,
) -> np.ndarray:
    """Scores [S, Q] of the slides made of each subset of tiles (row indices into features [N, D] and
    0.5-mpp coords [N, 2]) against texts [Q, D]: re-encoded through the slide encoder and the projection in
    batches of equal-size subsets of at most `tokens_per_pass` tiles (one encoder call per batch)."""
    from vlm.device import autocast

    device = next(encoder.parameters()).device
    features_t = torch.as_tensor(np.ascontiguousarray(features), dtype=torch.float32)
    coords_t = torch.as_tensor(np.ascontiguousarray(coords), dtype=torch.float64)
    texts = texts.to(device, torch.float32)
    sizes = [len(s) for s in subsets]
    if min(sizes, default=1) == 0:
        raise UsageError("a subset of tiles to re-encode is empty; every slide needs at least one tile")
    out = np.zeros((len(subsets), len(texts)), dtype=np.float64)
    # subsets of equal size share a batch: rows of one length take the encoder's unpadded path (one attention
    # call for the batch instead of one per row); deletion / insertion curves have one size per step
    by_size = np.argsort(sizes, kind="stable")
    start = 0
    while start < len(by_size):
        size = sizes[by_size[start]]
        stop = start + 1
        while stop < len(by_size) and sizes[by_size[stop]] == size and (stop - start + 1) * size <= tokens_per_pass:
            stop += 1
        rows = by_size[start:stop]
        index = torch.as_tensor(np.stack([np.asarray(subsets[r], dtype=np.int64) for r in rows]))  # [B, size]
        with autocast(device, precision):
            pooled = encoder(features_t[index].to(device), coords_t[index].to(device), pool="mean")  # [B, E]
        projected = model.encode_slide_embeddings(pooled.float()).float().to(device)  # [B, P], L2-normalised
        out[rows] = (projected @ texts.T).double().cpu().numpy()
        start = stop
    return out


def occlusion_blocks(coords: np.ndarray, tile_size: float, block: int | str = "auto") -> np.ndarray:
    """Block id [N] of each tile: squares of `block` x `block` grid cells (0.5-mpp coords, cells of
    `tile_size` px); "auto" picks the side that gives about `OCCLUSION_BLOCKS` blocks."""
    cells = np.floor(np.asarray(coords, dtype=np.float64) / tile_size).astype(np.int64)  # [N, 2]
    if block == "auto":
        side = max(1, math.ceil(math.sqrt(len(cells) / OCCLUSION_BLOCKS)))
    else:
        side = int(block)
        if side < 1:
            raise UsageError(f"occlusion block must be at least 1 tile, got {block!r}")
    _, ids = np.unique(cells // side, axis=0, return_inverse=True)
    return ids.reshape(-1)


def occlusion_scores(
    model: SlideTextModel,
    encoder: torch.nn.Module,
    features: np.ndarray,
    coords: np.ndarray,
    texts: torch.Tensor,
    block: int | str = "auto",
    precision: str = "auto",
    tokens_per_pass: int = TOKENS_PER_PASS,
) -> tuple[np.ndarray, np.ndarray]:
    """Tile scores [N, Q] by region occlusion, `S(x) - S(x without the tile's block)`, and slide scores [Q]."""
    ids = occlusion_blocks(coords, encoder.config.tile_size, block)
    everything = np.arange(len(features))
    blocks = [everything[ids != b] for b in range(ids.max() + 1)]
    if any(len(rest) == 0 for rest in blocks):  # one block holds every tile: nothing would be left
        raise InputError(f"the slide's {len(features)} tiles fall in one occlusion block; give a smaller block")
    scores = subset_scores(model, encoder, features, coords, [everything, *blocks], texts, precision,
                           tokens_per_pass)
    slide = scores[0]
    return (slide[None] - scores[1:][ids]).astype(np.float32), slide.astype(np.float32)


def _curve_subsets(order: np.ndarray, steps: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Deletion subsets (the slide less its first k/steps of `order`, k = 0..steps-1) and insertion subsets
    (its first k/steps, k = 1..steps), each with at least one tile."""
    n = len(order)
    counts = [round(k * n / steps) for k in range(steps + 1)]
    deletion = [np.sort(order[min(c, n - 1) :]) for c in counts[:-1]]
    insertion = [np.sort(order[: max(c, 1)]) for c in counts[1:]]
    return deletion, insertion


@dataclass
class Faithfulness:
    """Deletion and insertion areas of one map against the same curves in random tile orders."""

    deletion_auc: float
    insertion_auc: float
    random_deletion_auc_mean: float
    random_deletion_auc_std: float
    random_insertion_auc_mean: float
    random_insertion_auc_std: float
    gap: float  # insertion_auc - deletion_auc
    random_gap_mean: float
    random_gap_std: float
    better_than_random: bool
    steps: int
    random_orders: int
    deletion_curve: list[float] = field(default_factory=list)
    insertion_curve: list[float] = field(default_factory=list)

    @property
    def spreads(self) -> float:
        """The gap's distance from the random mean, in random standard deviations (inf when they are 0)."""
        excess = self.gap - self.random_gap_mean
        if self.random_gap_std > 0:
            return excess / self.random_gap_std
        return 0.0 if excess == 0 else math.copysign(math.inf, excess)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "spreads_above_random": self.spreads}


def faithfulness(
    model: SlideTextModel,
    encoder: torch.nn.Module,
    features: np.ndarray,
    coords: np.ndarray,
    scores: np.ndarray,
    texts: torch.Tensor,
    steps: int = FAITHFULNESS_STEPS,
    random_orders: int = RANDOM_ORDERS,
    seed: int = 0,
    precision: str = "auto",
    tokens_per_pass: int = TOKENS_PER_PASS,
) -> list[Faithfulness]:
    """Faithfulness of each map (tile scores [N, Q], column q a map of texts[q]) by deletion and insertion
    in the map's order (hottest first) against `random_orders` random orders (module docstring). All
    curves of all maps are re-encoded together, batched."""
    n = len(features)
    if n < 2:
        raise InputError("faithfulness needs a slide of at least two tiles")
    if steps < 2 or random_orders < 2:
        raise UsageError(f"faithfulness needs steps >= 2 and random_orders >= 2, got {steps} and {random_orders}")
    rng = np.random.default_rng(seed)
    orders = [np.argsort(-scores[:, q], kind="stable") for q in range(scores.shape[1])]
    orders += [rng.permutation(n) for _ in range(random_orders)]
    subsets: list[np.ndarray] = []
    for order in orders:
        deletion, insertion = _curve_subsets(order, steps)
        subsets += deletion + insertion
    curves = subset_scores(model, encoder, features, coords, subsets, texts, precision, tokens_per_pass)
    curves = curves.reshape(len(orders), 2, steps, len(texts))  # [order, deletion|insertion, step, Q]
    areas = curves.mean(2)  # [order, 2, Q]
    results = []
    for q in range(len(texts)):
        deletion, insertion = areas[q, 0, q], areas[q, 1, q]
        random_del, random_ins = areas[len(texts) :, 0, q], areas[len(texts) :, 1, q]
        random_gap = random_ins - random_del
        gap = insertion - deletion
        mean, std = float(random_gap.mean()), float(random_gap.std(ddof=1))
        results.append(Faithfulness(
            float(deletion), float(insertion), float(random_del.mean()), float(random_del.std(ddof=1)),
            float(random_ins.mean()), float(random_ins.std(ddof=1)), float(gap), mean, std,
            bool(gap > mean + RANDOM_SPREADS * std), steps, random_orders,
            [float(v) for v in curves[q, 0, :, q]], [float(v) for v in curves[q, 1, :, q]],
        ))
    return results


@dataclass
class SlideHeat:
    """Tile scores of one slide for some queries, with each map's faithfulness."""

    slide_id: str
    queries: list[str]
    coords: np.ndarray  # [N, 2] level-0 (x, y) of each tile's top-left corner
    tile_size: int  # level-0 px
    scores: np.ndarray  # [N, Q] tile scores (method "share": their mean over tiles = slide_scores)
    slide_scores: np.ndarray  # [Q] the slide's cosine score per query (or class contrast)
    method: str = "share"
    faithfulness: list[Faithfulness] | None = None

    @property
    def measurement_names(self) -> list[str]:
        """`score` for one query; `score: <query>` for several (QuPath measurement / CSV column names)."""
        return ["score"] if len(self.queries) == 1 else [f"score: {q}" for q in self.queries]


def slide_heat(
    model: SlideTextModel,
    encoder: torch.nn.Module,
    feature_path: str | os.PathLike[str],
    queries: Sequence[str],
    texts: torch.Tensor | None = None,
    mpp: float | None = None,
    method: str = "share",
    block: int | str = "auto",
    faithful: bool = True,
    precision: str = "auto",
    steps: int = FAITHFULNESS_STEPS,
    random_orders: int = RANDOM_ORDERS,
) -> SlideHeat:
    """Tile scores of one feature file for `queries` (texts [Q, D] given: e.g. zero-shot class contrasts),
    by `method`, with each map's faithfulness unless `faithful` is False (the viewer's quick maps)."""
    from vlm.encoders.slide_inputs import prepare_slide_inputs
    from vlm.formats.features import read_features
    from vlm.io import slide_id_from_path

    if method not in METHODS:
        raise UsageError(f"unknown heatmap method {method!r}; choose one of {', '.join(METHODS)}")
    if texts is None:
        texts = model.encode_text(list(queries), device="cpu")
    config = encoder.config
    slide_id = slide_id_from_path(feature_path)
    tiles = read_features(feature_path, mpp=mpp)  # read once: the encoder inputs and the level-0 tile corners
    grid = tiles.grid
    inputs = prepare_slide_inputs(tiles.features, grid.coords, grid.mpp, grid.tile_size_level0, slide_id,
                                  str(feature_path), config.in_dim, config.tile_size, config.grid_size)
    if method == "share":
        scores, slide = tile_scores(model, encoder, inputs.features, inputs.coords, texts)
    else:
        scores, slide = occlusion_scores(model, encoder, inputs.features, inputs.coords, texts, block, precision)
    measured = None
    if faithful:
        measured = faithfulness(model, encoder, inputs.features, inputs.coords, scores, texts, steps, random_orders,
                                precision=precision)
    return SlideHeat(slide_id, list(queries), grid.coords, grid.tile_size_level0, scores, slide, method, measured)

"""Figures: ROC curves and confusion matrices as PNG bytes; tile heat painted on a slide-shaped grid.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot, no global state, no
display needed), and returned as bytes so that callers write them atomically with the rest of a run.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from vlm.model.attribution import SlideHeat

_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    return buffer.getvalue()


def roc_png(
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    positive: int | None = None,
    title: str = "",
) -> bytes:
    """ROC curve(s) as PNG: the positive class's score for a binary task, else one-vs-rest per class.

    Classes without both positive and negative cases are left out (their ROC is undefined) and named in
    the legend title, so a missing curve is never a silent omission. Each class has its own line style and
    markers, so curves that coincide (two perfect classes) stay visible; the title gives n and the (macro) AUC.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = Figure(figsize=(4.8, 4.5))
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    scored = [positive] if positive is not None else range(len(class_names))
    skipped, aucs = [], []
    for drawn, index in enumerate(scored):
        truth = labels == index
        if truth.all() or not truth.any():
            skipped.append(class_names[index])
            continue
        fpr, tpr, _ = roc_curve(truth, probabilities[:, index])
        auc = roc_auc_score(truth, probabilities[:, index])
        aucs.append(auc)
        # Later curves are thinner and dashed, with their own markers, so that a curve lying on another shows.
        axes.plot(fpr, tpr, linewidth=max(3.5 - 1.0 * drawn, 1.0), linestyle=_LINESTYLES[drawn % len(_LINESTYLES)],
                  marker=_MARKERS[drawn % len(_MARKERS)], markersize=max(8 - 1.5 * drawn, 3), alpha=0.85,
                  label=f"{class_names[index]} (AUC {auc:.3f})")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(-0.02, 1), ylim=(0, 1.03))
    heading = title or ("ROC" if positive is not None else "ROC, one-vs-rest")
    summary = f"n = {len(labels)}"
    if aucs:
        summary += f", {'AUC' if positive is not None else 'macro AUC'} {float(np.mean(aucs)):.3f}"
    axes.set_title(f"{heading}\n{summary}", fontsize=10)
    if len(skipped) == len(scored):
        axes.text(0.5, 0.5, "ROC undefined:\nonly one class has cases", ha="center", va="center")
    else:
        legend_title = f"undefined: {', '.join(skipped)}" if skipped else None
        axes.legend(loc="lower right", fontsize=8, title=legend_title, title_fontsize=7)
    return _png(figure)


def confusion_png(counts: np.ndarray, class_names: Sequence[str], title: str = "") -> bytes:
    """Confusion matrix as PNG: colour = row-normalised recall, text = count and row percentage."""
    counts = np.asarray(counts)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = 1.2 + 0.7 * len(class_names)
    figure = Figure(figsize=(size + 1.2, size))
    axes = figure.add_subplot()
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of true class")
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set(xlabel="predicted", ylabel="true")
    axes.set_title(f"{title or 'confusion matrix'}\nn = {int(counts.sum())}", fontsize=10)
    for row in ticks:
        for col in ticks:
            colour = "white" if share[row, col] > 0.5 else "black"
            axes.text(
                col,
                row,
                f"{counts[row, col]}\n{share[row, col]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color=colour,
            )
    return _png(figure)


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

    valid = np.isfinite(grid)  # a grid without any tile (none inside the slide) is all transparent
    low, high = (float(grid[valid].min()), float(grid[valid].max())) if valid.any() else (0.0, 1.0)
    scaled = np.where(valid, (grid - low) / (high - low if high > low else 1.0), 0.0)
    rgba = (colormaps[cmap](scaled) * 255).astype(np.uint8)
    rgba[..., 3] = np.where(valid, int(alpha * 255), 0)
    return rgba

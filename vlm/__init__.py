"""vlm: align whole-slide images and pathology reports.

The public API is flat and lazy: `from vlm import embed_tiles` imports the module that defines it on first
use, so `import vlm` (and `vlm --help`) loads no torch, FAISS or transformers. `_EXPORTS` is the one table
from public name to `module:attribute`; moving a function means changing its row here, nothing else. No exported
name is also the name of a module `vlm.<name>` (stage modules are named for what they hold: `vlm.training`,
`vlm.tile_features`, `vlm.slide_embeddings`), so `import vlm.training as T` is the package and `vlm.train` the
function, whatever was imported first.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # errors: every error vlm raises on purpose is a VlmError
    "VlmError": "vlm.errors:VlmError",
    "InputError": "vlm.errors:InputError",
    "MissingInputError": "vlm.errors:MissingInputError",
    "UsageError": "vlm.errors:UsageError",
    "RunError": "vlm.errors:RunError",
    # cohorts: reports + slides -> pairs, public tables -> labels
    "build_pairs": "vlm.cohort:build_pairs",
    "slide_ids_from": "vlm.cohort:slide_ids_from",
    "clean_report": "vlm.report_cleaning:clean_report",
    "load_cleaning_rules": "vlm.report_cleaning:load_cleaning_rules",
    "build_labels": "vlm.labels:build_labels",
    "read_maf": "vlm.formats.maf:read_maf",
    # slides and tiles
    "open_slide": "vlm.wsi.slide:open_slide",
    "tile_slides": "vlm.tile:tile_slides",
    "TilingParams": "vlm.wsi.tiling:TilingParams",
    # tile features
    "create_tile_encoder": "vlm.encoders.tile:create_tile_encoder",
    "embed_tiles": "vlm.tile_features:embed_tiles",
    "embed_grid": "vlm.tile_features:embed_grid",
    "read_features": "vlm.formats.features:read_features",
    "feature_files": "vlm.formats.features:feature_files",
    # slide embeddings
    "create_slide_encoder": "vlm.encoders.slide:create_slide_encoder",
    "to_gigapath_coords": "vlm.encoders.positions:to_gigapath_coords",
    "load_slide_inputs": "vlm.encoders.slide_inputs:load_slide_inputs",
    "pad_batch": "vlm.encoders.slide_inputs:pad_batch",
    "embed_slides": "vlm.slide_embeddings:embed_slides",
    "embed_with_model": "vlm.slide_embeddings:embed_with_model",
    "load_slide_embeddings": "vlm.formats.embeddings:load_slide_embeddings",
    # alignment model and training
    "SlideTextModel": "vlm.model.clip:SlideTextModel",
    "create_model": "vlm.model.clip:create_model",
    "TrainConfig": "vlm.training.config:TrainConfig",
    "train": "vlm.training.loop:train",
    "TrainResult": "vlm.training.loop:TrainResult",
    # zero-shot
    "load_prompt_task": "vlm.prompts:load_prompt_task",
    "ZeroShotClassifier": "vlm.model.zeroshot:ZeroShotClassifier",
    "run_zeroshot": "vlm.zeroshot:run_zeroshot",
    "classify_zero_shot": "vlm.zeroshot:classify_zero_shot",
    "write_zeroshot": "vlm.zeroshot:write_zeroshot",
    "ZeroShotResult": "vlm.zeroshot:ZeroShotResult",
    # retrieval
    "SlideIndex": "vlm.retrieval.index:SlideIndex",
    "ReportIndex": "vlm.retrieval.reports:ReportIndex",
    "evaluate_retrieval": "vlm.retrieval.evaluate:evaluate_retrieval",
    # supervised baseline, heatmaps, viewer
    "run_probe": "vlm.probe:run_probe",
    "run_heatmaps": "vlm.heatmap:run_heatmaps",
    "create_app": "vlm.serve.app:create_app",
    # metrics and figures
    "classification_metrics": "vlm.metrics:classification_metrics",
    "retrieval_recalls": "vlm.metrics:retrieval_recalls",
    "roc_png": "vlm.plots:roc_png",
    # shipped data, devices (the demo's names are in `vlm.demo`)
    "shipped_tasks": "vlm.resources:shipped_tasks",
    "resolve_device": "vlm.device:resolve_device",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def _lazy_export(namespace: dict[str, Any], exports: dict[str, str], name: str) -> Any:
    """The module-level `__getattr__` of a lazy package (`vlm`, `vlm.demo`): import `exports[name]`
    (`module:attribute`) on first use and keep it in the package's `namespace`."""
    target = exports.get(name)
    if target is None:
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    module, attribute = target.split(":")
    value = getattr(importlib.import_module(module), attribute)
    namespace[name] = value  # later look-ups skip __getattr__
    return value


def __getattr__(name: str) -> Any:
    return _lazy_export(globals(), _EXPORTS, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

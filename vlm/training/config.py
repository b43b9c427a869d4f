"""`TrainConfig`: every setting of a training run, and the single source of `vlm train`'s flags.

Each field's metadata carries its command-line help and help-page group (`vlm.commands.options.add_config_options`
turns the fields into flags), so the defaults of Python and of the command line are the same values. This
module imports nothing heavy: `vlm --help` builds the train page from it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.errors import InputError, MissingInputError, UsageError
from vlm.io import atomic_path
from vlm.settings import DEFAULT_MAX_LENGTH, DEFAULT_TEXT_ENCODER, LOSSES, POOLS, PRECISIONS

CONFIG_FILE = "train_config.json"
# Fields renamed since a release that saved configs: old name -> new name, applied when a saved config is read.
_RENAMED = {"slide_embeddings": "embeddings"}


def _setting(default: Any = dataclasses.MISSING, help: str = "", group: str = "", **cli: Any) -> Any:
    """A field with its command-line help and group; `cli` holds further argparse wording (flags, choices, ...).

    `resumable=True` marks a setting that `--resume` may change; the saved config gives all others.
    """
    return field(default=default, metadata={"help": help, "group": group, **cli})


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as `train_config.json` in the run folder."""

    pairs: str = _setting(
        help="CSV / Parquet / JSONL with slide_id, report [, patient_id, split]; one row per slide. Rows sharing a "
        "patient_id, report text or slide_id are one case: a batch holds at most one slide of a case and validation "
        "recall counts any of the case's slides as a hit",
        group="data",
    )
    out: str = _setting(help="run folder (model/, metrics.jsonl, checkpoints/)", group="data")
    embeddings: str | None = _setting(
        None, "slide embeddings parquet from `vlm embed-slides` (frozen tower)", "data", exclusive="slide input",
        metavar="PARQUET", deprecated=("--slide-embeddings",),
    )
    features: str | None = _setting(
        None, "folder of <slide_id>.h5 tile features (fine-tunes the slide encoder)", "data", exclusive="slide input"
    )
    mpp: float | None = _setting(None, group="data")  # help: the shared --mpp of feature-file readers
    patches: str | None = _setting(None, group="data")  # help: the shared --patches
    val_fraction: float = _setting(0.1, "validation share of patients without a split column", "data")
    test_fraction: float = _setting(0.0, "test share of patients without a split column", "data")
    drop_missing: bool = _setting(
        False, "drop pairs whose slide has no embedding, or no usable feature file (all are listed first)", "data"
    )
    max_tiles: int | None = _setting(None, "subsample slides to this many tiles in training (default: all)", "data")

    text_encoder: str = _setting(DEFAULT_TEXT_ENCODER, "hub id or local folder of a BERT-family model", "model")
    max_length: int = _setting(DEFAULT_MAX_LENGTH, "tokens per report; longer ones are truncated", "model")
    proj_dim: int = _setting(512, "shared embedding dimension", "model")
    slide_encoder: str = _setting("gigapath", "slide encoder preset for --features", "model")
    slide_checkpoint: str | None = _setting(None, "slide encoder weights (slide_encoder.pth)", "model")
    pool: str = _setting("mean", group="model")  # help and choices: the shared --pool
    loss: str = _setting("clip", "open_clip's ClipLoss or SigLipLoss", "model", choices=LOSSES)

    epochs: int = _setting(10, "epochs; with --resume: extend the run to this many", "optimisation", resumable=True)
    batch_size: int = _setting(
        64,
        "pairs per contrastive batch and optimizer step (at most one slide per case; lowered to the number of "
        "training cases when fewer)",
        "optimisation",
        flags=("--batch-size", "--contrastive-batch"),
    )
    chunk_size: int | None = _setting(
        None, "GradCache chunk: pairs embedded with gradients at once (default: whole batch when frozen, 4 when "
        "fine-tuning)", "optimisation",
    )
    lr: float = _setting(1e-4, "peak learning rate (AdamW)", "optimisation")
    weight_decay: float = _setting(0.2, "AdamW weight decay of the weight matrices", "optimisation")
    warmup_steps: int | None = _setting(None, "linear warm-up steps (default: 5% of all steps)", "optimisation")
    grad_clip: float = _setting(1.0, "max gradient norm (0 = off)", "optimisation")
    freeze_slide: bool = _setting(False, "keep the slide encoder fixed (heads still train)", "optimisation")
    freeze_text: bool = _setting(False, "keep the text transformer fixed (heads still train)", "optimisation")
    unfreeze_text_last: int = _setting(0, "train only the last N text layers", "optimisation")
    grad_checkpointing: bool = _setting(False, "recompute activations to save memory", "optimisation")
    checkpoint_every: int = _setting(0, "also checkpoint every N steps (0 = at epoch ends only)", "optimisation")
    eval_batch_size: int = _setting(64, "pairs per batch when validating", "optimisation")
    seed: int = _setting(0, "seed of the splits, the batches and the initial weights", "optimisation")
    device: str = _setting("auto", group="optimisation")  # help: the shared --device
    precision: str = _setting("auto", group="optimisation")  # help and choices: the shared --precision

    def __post_init__(self) -> None:
        if (self.embeddings is None) == (self.features is None):
            raise InputError("give exactly one slide input: `embeddings` (frozen) or `features` (fine-tuning)")
        for name in ("epochs", "batch_size", "eval_batch_size", "proj_dim", "max_length"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise UsageError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.lr <= 0:
            raise UsageError(f"lr must be positive, got {self.lr}")
        if self.unfreeze_text_last < 0:
            raise UsageError("`unfreeze_text_last` must be >= 0")
        for name, allowed in (("pool", POOLS), ("loss", LOSSES), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:  # before any data is read, not at the first step
                raise InputError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")

    def resumed(self, out: str | Path, changes: dict[str, Any], path: Path) -> TrainConfig:
        """These saved settings (read from `path`) continued in the folder `out` with `changes`.

        A resumed run keeps the settings it was started with: a change of any but the `resumable` ones
        (epochs) is refused, not silently applied or ignored.
        """
        resumable = {f.name for f in dataclasses.fields(self) if f.metadata.get("resumable")}
        changed = [name for name, value in changes.items() if name not in resumable and value != getattr(self, name)]
        if changed:
            flags = ", ".join("--" + name.replace("_", "-") for name in changed)
            raise InputError(
                f"{path}: a resumed run continues with these settings; {flags} cannot change (only `epochs` can): "
                "drop them, or start a new run with another `out`"
            )
        return dataclasses.replace(self, out=str(out), **changes)

    @property
    def frozen(self) -> bool:
        return self.embeddings is not None

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        if not path.is_file():
            raise MissingInputError(f"{path}: missing; `resume` needs a run folder written by `vlm train`")
        values = json.loads(path.read_text())
        for old, new in _RENAMED.items():  # a run saved by an earlier vlm still resumes
            if old in values and new not in values:
                values[new] = values.pop(old)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{path}: unknown keys {unknown}; was it written by a newer vlm?")
        return cls(**values)

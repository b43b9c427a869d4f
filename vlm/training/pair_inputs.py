"""A run's data: its pairs with their splits, checked against the slide inputs, and each row's slide and report.

`prepare_pairs` reads the pairs, assigns the splits and checks every slide input before the first step, so a
run does not stop hours in on a bad file; `Inputs` encodes rows of pairs from cached slide embeddings or
feature files, and from the tokenised reports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm.encoders.slide_inputs import check_tile_encoders
from vlm.errors import InputError
from vlm.formats.embeddings import SlideEmbeddings, load_slide_embeddings
from vlm.formats.features import feature_files
from vlm.formats.pairs import SPLITS, Pairs, check_slides_available, load_pairs
from vlm.io import atomic_path
from vlm.model.clip import SlideTextModel
from vlm.training import data as pairs_data
from vlm.training.config import TrainConfig

log = logging.getLogger(__name__)


class Inputs:
    """Slide inputs of the pairs (cached embeddings or feature files) and their reports, by row."""

    def __init__(
        self, config: TrainConfig, pairs: Pairs, device: torch.device, table: SlideEmbeddings | None = None
    ) -> None:
        """`table`: `config.embeddings` when already loaded (else it is read here)."""
        self.config, self.pairs, self.device = config, pairs, device
        self.embeddings: Tensor | None = None
        self.slide_dim: int | None = None  # width of the cached slide embeddings (None: feature files)
        self._text_features: Tensor | None = None
        if config.embeddings is not None:
            table = table if table is not None else load_slide_embeddings(config.embeddings)
            self.embeddings = table.lookup(pairs.slide_ids).to(device)  # [N_pairs, D]
            self.slide_dim = table.dim
            used = pairs.indices("train") + pairs.indices("val")  # test rows are never read by training
            table.check_finite([pairs.slide_ids[i] for i in used])
            log.info(
                "slide embeddings: %d slides, %d-d, encoder=%s pool=%s",
                len(table.ids),
                table.dim,
                table.encoder,
                table.pool,
            )
        self.tokens: pairs_data.ReportTokens | None = None  # set by `tokenize` once the text tower is known
        self.features = Path(config.features) if config.features is not None else None
        self.loader = (
            pairs_data.PrefetchingFeatureLoader(self.features, config.mpp, config.patches)
            if self.features is not None
            else None
        )

    def encode_slides(self, model: SlideTextModel, rows: Sequence[int], seed: int = 0) -> Tensor:
        if self.embeddings is not None:
            return model.encode_slide_embeddings(self.embeddings[list(rows)])
        assert self.loader is not None
        max_tiles = self.config.max_tiles if model.training else None
        feats, coords, mask = self.loader.load([self.pairs.slide_ids[i] for i in rows], max_tiles, seed)
        return model.encode_slides(feats.to(self.device), coords.to(self.device), mask.to(self.device))

    def plan_slides(self, chunks: list[list[int]], training: bool, seed: int = 0) -> None:
        """Tell the feature loader which row chunks `encode_slides` gets next, so it can read ahead."""
        if self.loader is not None:
            max_tiles = self.config.max_tiles if training else None
            self.loader.plan([([self.pairs.slide_ids[i] for i in c], max_tiles, seed) for c in chunks])

    def tokenize(self, model: SlideTextModel) -> None:
        """Tokenise every report once (`datasets` on-disk cache: re-runs and resumed runs read it back)."""
        self.tokens = pairs_data.ReportTokens(self.pairs.reports, model.text.tokenizer, model.text.max_length)

    def _tokens(self, model: SlideTextModel, rows: Sequence[int]) -> dict[str, Tensor]:
        if self.tokens is not None:
            return self.tokens.batch(rows, self.device)
        return model.text.tokenize([self.pairs.reports[i] for i in rows], device=self.device)

    def encode_texts(self, model: SlideTextModel, rows: Sequence[int]) -> Tensor:
        if not any(p.requires_grad for p in model.text.parameters()):
            return F.normalize(model.text_proj(self._frozen_text_features(model)[list(rows)]), dim=-1)
        return model.encode_tokens(self._tokens(model, rows))

    def _frozen_text_features(self, model: SlideTextModel) -> Tensor:
        """A fully frozen text tower is a fixed function: run it once per report (eval mode) and reuse it.

        This turns `--freeze-text` training from one text-tower pass per step into one pass per run.
        """
        if self._text_features is None:
            was_training = model.text.training
            model.text.eval()
            n = len(self.pairs.reports)
            with torch.no_grad():
                self._text_features = torch.cat(
                    [model.text(**self._tokens(model, range(i, min(i + 64, n)))).float() for i in range(0, n, 64)]
                )  # [N_pairs, text width]
            model.text.train(was_training)
        return self._text_features


def prepare_pairs(config: TrainConfig, table: SlideEmbeddings | None = None) -> Pairs:
    """The run's pairs with their splits, checked against the slide inputs (`table`: the loaded
    `config.embeddings`, else it is read here)."""
    pairs = load_pairs(config.pairs)
    pairs = pairs_data.assign_splits(pairs, config.val_fraction, config.test_fraction, config.seed)
    if config.embeddings is not None:
        ids = set((table if table is not None else load_slide_embeddings(config.embeddings)).ids)
        source = config.embeddings
    else:
        ids = pairs_data.feature_slide_ids(config.features or "")
        source = str(config.features)
    pairs = check_slides_available(pairs, ids, source, drop_missing=config.drop_missing)
    if config.features is not None:
        pairs = pairs_data.check_feature_files(
            pairs, Path(config.features), config.drop_missing, mpp=config.mpp, patches=config.patches
        )
        check_tile_encoders(feature_files(config.features), config.slide_encoder)
    counts = {s: len(pairs.indices(s)) for s in SPLITS}
    log.info("pairs: %s (test pairs are never trained on)", ", ".join(f"{n} {s}" for s, n in counts.items()))
    if counts["train"] < 2:
        raise InputError(f"{config.pairs}: {counts['train']} training pair(s); contrastive training needs at least 2")
    return pairs


def write_splits(path: Path, pairs: Pairs) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "slide_id": pairs.slide_ids,
            "patient_id": pairs.patient_ids or pairs.slide_ids,
            "split": pairs.splits,
        }
    )
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)

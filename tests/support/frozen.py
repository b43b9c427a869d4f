"""A tiny frozen-tower model with its slide encoder saved, as `vlm train --embeddings` makes one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlm.encoders.slide import create_slide_encoder
from vlm.formats.features import TileFeatures, TileGrid, write_features
from vlm.slide_embeddings import embed_slides


def build_frozen_run(tmp_path: Path, slides: list[Path]) -> dict:
    """A tiny frozen-tower model made the way `vlm train --embeddings` makes it (its `build_model`),
    on embeddings from `embed_slides` with a saved tiny slide encoder, and a feature file per slide (random
    32-d features on a full tile grid; 0.5-mpp tiles whatever the slide's level-0 µm/px)."""
    from tests.support.models import build_tiny_text_encoder
    from vlm.training.config import TrainConfig
    from vlm.training.loop import build_model
    from vlm.wsi.slide import open_slide

    (tmp_path / "features").mkdir()
    feature_files = []
    for seed, slide in enumerate(slides):
        with open_slide(slide) as opened:
            (width, height), mpp = opened.dimensions, opened.mpp
        step = int(round(256 * 0.5 / mpp))
        xs, ys = np.meshgrid(np.arange(0, width - step + 1, step), np.arange(0, height - step + 1, step))
        coords = np.stack([xs.ravel(), ys.ravel()], 1)
        features = np.random.default_rng(seed).normal(size=(len(coords), 32)).astype(np.float32)
        path = tmp_path / "features" / f"{slide.stem}.h5"
        grid = TileGrid(coords, mpp=mpp, tile_size=256, target_mpp=0.5, tile_size_level0=step, slide_path=str(slide))
        write_features(path, TileFeatures(grid, features, encoder="test"))
        feature_files.append(path)
    encoder = create_slide_encoder("tiny")
    checkpoint = tmp_path / "slide_encoder.pt"
    torch.save(encoder.state_dict(), checkpoint)
    parquet = tmp_path / "slides.parquet"
    embed_slides(feature_files, parquet, encoder, progress=False, checkpoint=str(checkpoint))
    text = build_tiny_text_encoder(tmp_path / "text")
    config = TrainConfig(pairs="unused.csv", out=str(tmp_path / "run"), embeddings=str(parquet),
                         text_encoder=str(text), proj_dim=32, max_length=64)
    model_dir = build_model(config, 64, None).save_pretrained(tmp_path / "model")
    return {"model": model_dir, "features": feature_files[0], "slide": slides[0], "parquet": parquet,
            "checkpoint": checkpoint, "out": tmp_path / "heat", "feature_files": feature_files}

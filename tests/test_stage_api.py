"""Stage functions called from Python: device and precision given as names, embeddings passed in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.support.models import build_tiny_model
from vlm import (
    SlideTextModel,
    create_slide_encoder,
    create_tile_encoder,
    embed_slides,
    embed_tiles,
    load_slide_embeddings,
    run_zeroshot,
)
from vlm.formats.features import TileFeatures, TileGrid, read_features, write_features


def _features(folder: Path, n_slides: int = 2) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n_slides):
        coords = np.stack([np.arange(12) % 4, np.arange(12) // 4], axis=1) * 256
        grid = TileGrid(coords=coords, mpp=0.5, tile_size=256, target_mpp=0.5, tile_size_level0=256)
        features = rng.standard_normal((12, 32)).astype(np.float32)
        write_features(folder / f"s{i}.h5", TileFeatures(grid=grid, features=features, encoder="test"))
        paths.append(folder / f"s{i}.h5")
    return paths


def test_embed_tiles_takes_device_and_precision_names(tmp_path: Path, slide_05: Path) -> None:
    encoder = create_tile_encoder("timm:resnet10t", pretrained=False)
    report = embed_tiles([slide_05], tmp_path / "a", encoder, workers=0, progress=False)  # device="auto"
    assert report.done == ["synthetic_05"]
    report = embed_tiles([slide_05], tmp_path / "b", encoder, "cpu", precision="fp32", workers=0, progress=False)
    np.testing.assert_array_equal(
        read_features(tmp_path / "a" / "synthetic_05.h5").features,
        read_features(tmp_path / "b" / "synthetic_05.h5").features,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on CUDA")
def test_impossible_precision_is_refused_before_any_work(tmp_path: Path, slide_05: Path) -> None:
    encoder = create_tile_encoder("timm:resnet10t", pretrained=False)
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
        embed_tiles([slide_05], tmp_path / "tiles", encoder, "cpu", precision="fp16", workers=0, progress=False)
    assert not list((tmp_path / "tiles").glob("*.h5")) and not list(tmp_path.glob("tiles/failures*"))
    paths = _features(tmp_path / "features")
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
        embed_slides(paths, tmp_path / "s.parquet", create_slide_encoder("tiny"), precision="fp16", progress=False)
    assert not (tmp_path / "s.parquet").exists()


def test_embed_slides_resolves_auto_itself(tmp_path: Path) -> None:
    paths = _features(tmp_path / "features")
    encoder = create_slide_encoder("tiny")
    assert not embed_slides(paths, tmp_path / "auto.parquet", encoder, device="auto", progress=False).failed
    assert not embed_slides(paths, tmp_path / "cpu.parquet", encoder, device="cpu", progress=False).failed
    auto, cpu = load_slide_embeddings(tmp_path / "auto.parquet"), load_slide_embeddings(tmp_path / "cpu.parquet")
    assert auto.ids == cpu.ids == ["s0", "s1"]
    torch.testing.assert_close(auto.embeddings, cpu.embeddings)


def test_run_zeroshot_scores_embeddings_in_memory_like_the_file(tmp_path: Path) -> None:
    """Same predictions from the loaded table as from its parquet; a shipped task is named, not a path."""
    build_tiny_model(tmp_path / "build").save_pretrained(tmp_path / "model")
    model = SlideTextModel.from_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"slide_id": [f"s{i}" for i in range(8)], "n_tiles": 10, "encoder": "tiny", "pool": "mean"})
    frame["embedding"] = [rng.standard_normal(64).astype(np.float32).tolist() for _ in range(8)]
    frame.to_parquet(tmp_path / "slides.parquet")
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": frame["slide_id"], "label": ["LUAD", "LUSC"] * 4}).to_csv(labels, index=False)
    common = dict(task="nsclc_subtyping", labels=labels, cache_dir=tmp_path / "cache", n_boot=20, progress=False)
    from_file = run_zeroshot(model, tmp_path / "slides.parquet", tmp_path / "file", **common)
    in_memory = run_zeroshot(model, load_slide_embeddings(tmp_path / "slides.parquet"), tmp_path / "mem", **common)
    assert from_file["metrics"] == in_memory["metrics"]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "file" / "predictions.csv"), pd.read_csv(tmp_path / "mem" / "predictions.csv")
    )
    assert '"slides": "<in memory>"' in (tmp_path / "mem" / "run.json").read_text()

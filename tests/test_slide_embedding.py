"""`vlm embed-slides` and `vlm.slide_embedding`: parquet columns, resume, failures, shards."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vlm.batch import Shard
from vlm.cli import main
from vlm.encoders.slide import create_slide_encoder
from vlm.features import TileFeatures, TileGrid, write_features
from vlm.slide_embedding import embed_slides, read_slide_embeddings


def _write_slide(folder: Path, name: str, n: int, seed: int, dim: int = 32, mpp: float = 0.25) -> Path:
    rng = np.random.default_rng(seed)
    cells = rng.choice(200 * 200, size=n, replace=False)
    coords = np.stack([cells // 200, cells % 200], axis=1) * 512  # level-0 px at 0.25 mpp, 256 px at 0.5
    grid = TileGrid(coords=coords, mpp=mpp, tile_size=256, target_mpp=0.5, tile_size_level0=512)
    features = rng.standard_normal((n, dim)).astype(np.float32)
    path = folder / f"{name}.h5"
    write_features(path, TileFeatures(grid=grid, features=features, encoder="test"))
    return path


@pytest.fixture
def features_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "features"
    folder.mkdir()
    for index, n in enumerate([30, 75, 140]):
        _write_slide(folder, f"slide-{index}", n, seed=index)
    return folder


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny.pth"
    torch.save({"model": create_slide_encoder("tiny").state_dict()}, path)
    return path


def test_cli_writes_one_row_per_slide_and_resumes(features_dir: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "slides.parquet"
    argv = ["embed-slides", str(features_dir), "--out", str(out), "--slide-encoder", "tiny", "--checkpoint",
            str(checkpoint), "--pool", "all-layers", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    frame = read_slide_embeddings(out)
    assert list(frame.columns) == ["slide_id", "embedding", "n_tiles", "encoder", "pool"]
    assert frame["slide_id"].tolist() == ["slide-0", "slide-1", "slide-2"]
    assert frame["n_tiles"].tolist() == [30, 75, 140]
    assert set(frame["encoder"]) == {"tiny"} and set(frame["pool"]) == {"all-layers"}
    assert np.stack(frame["embedding"]).shape == (3, 3 * 64)

    _write_slide(features_dir, "slide-3", 10, seed=3)
    (features_dir / "slide-9.h5").write_bytes(b"not hdf5")
    assert main(argv) == 1  # the broken file fails, the others are kept or added
    again = read_slide_embeddings(out)
    assert again["slide_id"].tolist() == ["slide-0", "slide-1", "slide-2", "slide-3"]
    np.testing.assert_array_equal(np.stack(again["embedding"][:3]), np.stack(frame["embedding"]))
    with open(tmp_path / "failures.csv") as handle:
        failures = list(csv.DictReader(handle))
    assert [row["slide"] for row in failures] == ["slide-9"]

    with pytest.raises(ValueError, match="pool='all-layers'"):  # resuming with another pool is refused
        embed_slides([features_dir / "slide-0.h5"], out, create_slide_encoder("tiny"), pool="mean", progress=False)


def test_batched_run_equals_one_slide_at_a_time(features_dir: Path, tmp_path: Path) -> None:
    encoder = create_slide_encoder("tiny")
    paths = sorted(features_dir.glob("*.h5"))
    embed_slides(paths, tmp_path / "one.parquet", encoder, batch_size=1, progress=False)
    embed_slides(paths, tmp_path / "three.parquet", encoder, batch_size=3, progress=False)
    one, three = (
        read_slide_embeddings(tmp_path / "one.parquet"),
        read_slide_embeddings(tmp_path / "three.parquet"),
    )
    np.testing.assert_allclose(np.stack(one["embedding"]), np.stack(three["embedding"]), atol=1e-5)


def test_batches_hold_slides_of_similar_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --batch-size > 1 slides are bucketed by tile count: little padding, same numbers, rows by id."""
    import vlm.slide_embedding as slide_embedding

    folder = tmp_path / "features"
    folder.mkdir()
    lengths = {"a": 200, "b": 20, "c": 190, "d": 25, "e": 180, "f": 30}
    paths = [_write_slide(folder, name, n, seed=i) for i, (name, n) in enumerate(lengths.items())]
    batches: list[list[int]] = []
    real = slide_embedding._embed_batch

    def recording(items, *args, **kwargs):  # type: ignore[no-untyped-def]
        batches.append(sorted(len(features) for features, _ in items))
        return real(items, *args, **kwargs)

    monkeypatch.setattr(slide_embedding, "_embed_batch", recording)
    encoder = create_slide_encoder("tiny")
    embed_slides(paths, tmp_path / "three.parquet", encoder, batch_size=3, progress=False)
    assert batches == [[20, 25, 30], [180, 190, 200]]
    embed_slides(paths, tmp_path / "one.parquet", encoder, batch_size=1, progress=False)
    one, three = read_slide_embeddings(tmp_path / "one.parquet"), read_slide_embeddings(tmp_path / "three.parquet")
    assert list(three["slide_id"]) == list(one["slide_id"]) == sorted(lengths)
    np.testing.assert_allclose(np.stack(one["embedding"]), np.stack(three["embedding"]), atol=1e-5)


def test_bad_slides_are_recorded_with_a_clear_reason(features_dir: Path, tmp_path: Path) -> None:
    _write_slide(features_dir, "wide", 12, seed=5, dim=48)
    _write_slide(features_dir, "huge", 12, seed=6, mpp=5.0)  # level-0 px far outside the position grid
    nan_path = _write_slide(features_dir, "nan", 12, seed=7)
    with h5py.File(nan_path, "r+") as h5:
        h5["features"][0, 0] = np.nan
    _write_slide(features_dir, "empty", 0, seed=8)
    paths = sorted(features_dir.glob("*.h5"))
    report = embed_slides(paths, tmp_path / "s.parquet", create_slide_encoder("tiny"), progress=False)
    reasons = dict(report.failed)
    assert sorted(reasons) == ["empty", "huge", "nan", "wide"]
    assert "48-d" in reasons["wide"] and "NaN" in reasons["nan"] and "slide 'huge'" in reasons["huge"]
    assert "no tiles" in reasons["empty"]
    assert len(read_slide_embeddings(tmp_path / "s.parquet")) == 3


def test_shards_write_their_own_files_and_read_back_together(features_dir: Path, tmp_path: Path) -> None:
    encoder = create_slide_encoder("tiny")
    paths = sorted(features_dir.glob("*.h5"))
    out = tmp_path / "slides.parquet"
    for index in range(2):
        embed_slides(paths, out, encoder, shard=Shard(index, 2), progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [
        "slides.shard-0-of-2.parquet",
        "slides.shard-1-of-2.parquet",
    ]
    assert sorted(read_slide_embeddings(out)["slide_id"]) == ["slide-0", "slide-1", "slide-2"]


def test_tiny_encoder_without_checkpoint_is_refused(features_dir: Path, tmp_path: Path) -> None:
    argv = [
        "embed-slides",
        str(features_dir),
        "--out",
        str(tmp_path / "s.parquet"),
        "--slide-encoder",
        "tiny",
    ]
    assert main(argv) == 2

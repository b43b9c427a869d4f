"""`vlm embed-slides` and `vlm.slide_embeddings`: parquet columns, resume, failures, shards."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.support.peers import (
    clam_contour_grid,
    trident_grid,
    write_clam_features,
    write_clam_patches,
    write_trident_features,
)
from vlm.batch import Shard
from vlm.cli import main
from vlm.encoders.slide import create_slide_encoder
from vlm.formats.embeddings import load_slide_embeddings, read_slide_embeddings
from vlm.formats.features import TileFeatures, TileGrid, write_features
from vlm.slide_embeddings import embed_slides


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
            str(checkpoint), "--pool", "all-layers", "--device", "cpu", "--no-progress"]
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


def test_a_damaged_output_to_resume_points_to_overwrite(
    features_dir: Path, checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged existing --out said "re-run `vlm embed-slides`", the very command that failed, in a loop."""
    out = tmp_path / "slides.parquet"
    argv = ["embed-slides", str(features_dir), "--out", str(out), "--slide-encoder", "tiny", "--checkpoint",
            str(checkpoint), "--pool", "mean", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    out.write_bytes(out.read_bytes()[:100])
    assert main(argv) == 2
    assert "slides.parquet: the output to resume is damaged" in caplog.text and "pass --overwrite" in caplog.text
    assert main([*argv, "--overwrite"]) == 0
    assert read_slide_embeddings(out)["slide_id"].tolist() == ["slide-0", "slide-1", "slide-2"]


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
    import vlm.slide_embeddings as slide_embedding

    folder = tmp_path / "features"
    folder.mkdir()
    lengths = {"a": 200, "b": 20, "c": 190, "d": 25, "e": 180, "f": 30}
    paths = [_write_slide(folder, name, n, seed=i) for i, (name, n) in enumerate(lengths.items())]
    batches: list[list[int]] = []
    real = slide_embedding._embed_batch

    def recording(items, *args, **kwargs):  # type: ignore[no-untyped-def]
        batches.append(sorted(len(slide.features) for slide in items))
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
    _write_slide(features_dir, "huge", 12, seed=6, mpp=2.0)  # level-0 px far outside the position grid
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


def _clam_cohort(root: Path, dim: int = 32) -> tuple[Path, Path]:
    """A CLAM slide on an inexact scale: 513-px level-0 tiles (0.2495 µm/px), grid at the tissue's box."""
    (root / "patches").mkdir(parents=True)
    (root / "h5_files").mkdir()
    coords = write_clam_patches(root / "patches" / "s1.h5", [clam_contour_grid((1000, 3000), (6 * 513, 6 * 513), 513)],
                                patch_size=513)
    features = np.random.default_rng(3).standard_normal((len(coords), dim)).astype(np.float32)
    write_clam_features(root / "h5_files" / "s1.h5", coords, features)
    return root / "h5_files", root / "patches"


def test_one_feature_file_gives_one_embedding_through_every_path(tmp_path: Path) -> None:
    """embed-slides, the training loader and zero-shot on a features folder see identical encoder inputs."""
    from tests.support.models import build_tiny_model
    from vlm.encoders.slide_inputs import load_slide_inputs
    from vlm.slide_embeddings import embed_with_model
    from vlm.training.data import PrefetchingFeatureLoader, load_slide_features

    features, patches = _clam_cohort(tmp_path / "clam")
    model = build_tiny_model(tmp_path / "model", slide_encoder="tiny").eval()
    encoder, pool = model.slide_encoder, model.config.pool
    assert encoder is not None
    slide = load_slide_inputs(features / "s1.h5", mpp=0.2495, patches=patches)
    assert len({tuple(c) for c in slide.coords.tolist()}) == 36  # one cell per tile

    report = embed_slides([features / "s1.h5"], tmp_path / "e.parquet", encoder, pool=pool, progress=False,
                          mpp=0.2495, patches=patches)
    assert report.done == ["s1"]
    embedded = np.stack(read_slide_embeddings(tmp_path / "e.parquet")["embedding"])
    f, c, mask = load_slide_features(features, ["s1"], mpp=0.2495, patches=patches)
    np.testing.assert_array_equal(c[0].numpy(), slide.coords)
    f2, c2, _ = PrefetchingFeatureLoader(features, 0.2495, str(patches)).load(["s1"])
    assert torch.equal(f, f2) and torch.equal(c, c2)
    with torch.no_grad():
        trained = encoder(f, c, padding_mask=mask, pool=pool).numpy()
    assert not embed_with_model(features, model, tmp_path / "zs.parquet", device="cpu", progress=False, mpp=0.2495,
                                patches=patches).failed
    table = load_slide_embeddings(tmp_path / "zs.parquet")
    assert table.ids == ["s1"]
    zero_shot = table.embeddings.numpy()
    np.testing.assert_allclose(trained, embedded, rtol=0, atol=1e-6)
    np.testing.assert_allclose(zero_shot, embedded, rtol=0, atol=1e-6)


def test_cli_reads_clam_files_with_patches_and_mpp(tmp_path: Path, checkpoint: Path) -> None:
    features, patches = _clam_cohort(tmp_path / "clam")
    base = ["embed-slides", str(features), "--slide-encoder", "tiny", "--checkpoint", str(checkpoint),
            "--device", "cpu", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a.parquet")]) == 1  # no geometry: listed with the fix
    with open(tmp_path / "failures.csv") as handle:
        assert "--patches" in next(csv.DictReader(handle))["error"]
    assert main([*base, "--out", str(tmp_path / "b.parquet"), "--patches", str(patches), "--mpp", "0.2495"]) == 0
    assert read_slide_embeddings(tmp_path / "b.parquet")["n_tiles"].tolist() == [36]


def test_mixed_trident_cohort_embeds_without_mpp_and_a_contradicting_mpp_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TRIDENT records magnification, not mpp: 20× and 40× slides embed in one run, one cell per tile."""
    from vlm.encoders.slide_inputs import load_slide_inputs

    folder = tmp_path / "trident"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for name, magnification in (("s20", 20), ("s40", 40)):
        coords = trident_grid(4, 12, level0_magnification=magnification)
        write_trident_features(folder / f"{name}.h5", coords, rng.standard_normal((48, 32)).astype(np.float32),
                               level0_magnification=magnification)
        cells = load_slide_inputs(folder / f"{name}.h5").coords
        assert len({tuple(c) for c in cells.tolist()}) == 48
    encoder = create_slide_encoder("tiny")
    with caplog.at_level("INFO", logger="vlm.slide_embeddings"):
        report = embed_slides(sorted(folder.glob("*.h5")), tmp_path / "s.parquet", encoder, progress=False)
    assert report.done == ["s20", "s40"] and not report.failed
    assert "s20: level-0 0.5 µm/px from level0_magnification 20× (10 / magnification" in caplog.text
    # --mpp 0.25 on a 20× file would put its 48 tiles onto 12 cells: that slide fails, the 40× one is fine.
    report = embed_slides(sorted(folder.glob("*.h5")), tmp_path / "m.parquet", encoder, progress=False, mpp=0.25)
    assert report.done == ["s40"]
    assert [slide for slide, _ in report.failed] == ["s20"] and "contradicts" in report.failed[0][1]


@pytest.mark.slow
def test_cli_train_and_zeroshot_read_clam_features_with_patches_and_mpp(tmp_path: Path) -> None:
    """`vlm train --features` and `vlm zeroshot --features <folder>` take `--patches` / `--mpp` too."""
    import pandas as pd

    from tests.support.models import build_tiny_text_encoder
    from vlm.training.config import TrainConfig

    root = tmp_path / "clam"
    (root / "patches").mkdir(parents=True)
    (root / "h5_files").mkdir()
    rng = np.random.default_rng(5)
    rows = []
    for index in range(6):
        origin = (int(rng.integers(0, 5000)), int(rng.integers(0, 5000)))
        coords = write_clam_patches(root / "patches" / f"s{index}.h5",
                                    [clam_contour_grid(origin, (4 * 513, 3 * 513), 513)], patch_size=513)
        features = rng.standard_normal((len(coords), 32)).astype(np.float32)
        write_clam_features(root / "h5_files" / f"s{index}.h5", coords, features)
        rows.append({"slide_id": f"s{index}", "report": f"report number {index}"})
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    text = build_tiny_text_encoder(tmp_path / "text")
    geometry = ["--patches", str(root / "patches"), "--mpp", "0.2495"]
    argv = ["train", "--pairs", str(tmp_path / "pairs.csv"), "--features", str(root / "h5_files"), "--out",
            str(tmp_path / "run"), "--slide-encoder", "tiny", "--text-encoder", str(text), "--max-length", "16",
            "--proj-dim", "8", "--epochs", "1", "--batch-size", "3", "--val-fraction", "0.34", "--device", "cpu",
            "--no-progress", *geometry]
    assert main(argv) == 0
    saved = TrainConfig.load(tmp_path / "run" / "train_config.json")
    assert (saved.mpp, saved.patches) == (0.2495, str(root / "patches"))
    out = tmp_path / "zs"
    argv = ["zeroshot", "--model", str(tmp_path / "run" / "model"), "--features", str(root / "h5_files"),
            "--out", str(out), "--classes", "a=first kind", "b=second kind", "--no-progress", *geometry]
    assert main(argv) == 0
    assert read_slide_embeddings(out / "slide_embeddings.parquet")["n_tiles"].tolist() == [12] * 6


def test_an_interrupted_run_keeps_its_saved_rows_and_the_rerun_finishes(
    features_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parquet is saved every `save_every` slides: a kill loses at most the unsaved ones."""
    import vlm.slide_embeddings as slide_embedding
    real, calls = slide_embedding._embed_batch, []

    def killed_at_the_third(items, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append([slide.slide_id for slide in items])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(items, *args, **kwargs)

    monkeypatch.setattr(slide_embedding, "_embed_batch", killed_at_the_third)
    encoder, paths, out = create_slide_encoder("tiny"), sorted(features_dir.glob("*.h5")), tmp_path / "s.parquet"
    with pytest.raises(KeyboardInterrupt):
        embed_slides(paths, out, encoder, progress=False, save_every=1)
    assert read_slide_embeddings(out)["slide_id"].tolist() == ["slide-0", "slide-1"]
    monkeypatch.setattr(slide_embedding, "_embed_batch", real)
    report = embed_slides(paths, out, encoder, progress=False)
    assert (report.skipped, report.done) == (["slide-0", "slide-1"], ["slide-2"])
    assert read_slide_embeddings(out)["slide_id"].tolist() == ["slide-0", "slide-1", "slide-2"]


def test_a_failing_batch_is_retried_slide_by_slide(
    features_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that runs out of memory costs only the slide that fails alone, not its batch mates."""
    import vlm.slide_embeddings as slide_embedding
    real = slide_embedding._embed_batch

    def out_of_memory_over_100_tiles(items, *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(len(slide) > 100 for slide in items):
            raise RuntimeError("CUDA out of memory")
        return real(items, *args, **kwargs)

    monkeypatch.setattr(slide_embedding, "_embed_batch", out_of_memory_over_100_tiles)
    report = embed_slides(sorted(features_dir.glob("*.h5")), tmp_path / "s.parquet", create_slide_encoder("tiny"),
                          batch_size=3, progress=False)
    assert sorted(report.done) == ["slide-0", "slide-1"]
    assert report.failed == [("slide-2", "RuntimeError: CUDA out of memory")]
    assert read_slide_embeddings(tmp_path / "s.parquet")["slide_id"].tolist() == ["slide-0", "slide-1"]
    with open(tmp_path / "failures.csv") as handle:
        assert [row["slide"] for row in csv.DictReader(handle)] == ["slide-2"]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_nan_embedding_fails_its_slide_and_is_never_written(tmp_path: Path, batch_size: int) -> None:
    """Finite but huge features (3e38) overflow inside the encoder: that slide is a failure, not a NaN row."""
    folder = tmp_path / "features"
    folder.mkdir()
    for index in range(3):
        _write_slide(folder, f"slide-{index}", 40, seed=index)
    with h5py.File(folder / "slide-1.h5", "r+") as h5:
        h5["features"][...] = np.full(h5["features"].shape, 3e38, dtype=np.float32)
    torch.manual_seed(0)
    report = embed_slides(sorted(folder.glob("*.h5")), tmp_path / "slides.parquet", create_slide_encoder("tiny"),
                          batch_size=batch_size, progress=False)
    assert sorted(report.done) == ["slide-0", "slide-2"]
    assert [slide for slide, _ in report.failed] == ["slide-1"] and "NaN/inf" in report.failed[0][1]
    frame = read_slide_embeddings(tmp_path / "slides.parquet")
    assert sorted(frame["slide_id"]) == ["slide-0", "slide-2"]
    assert np.isfinite(np.stack(frame["embedding"])).all()
    with open(tmp_path / "failures.csv") as handle:
        assert [row["slide"] for row in csv.DictReader(handle)] == ["slide-1"]


@pytest.mark.slow
def test_cli_compile_gives_the_eager_embeddings(features_dir: Path, checkpoint: Path, tmp_path: Path) -> None:
    """`--compile` (token-wise layers through torch.compile) writes the eager run's numbers, batched and padded."""
    argv = ["embed-slides", str(features_dir), "--slide-encoder", "tiny", "--checkpoint", str(checkpoint),
            "--device", "cpu", "--no-progress", "--batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "eager.parquet")]) == 0
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    assert main([*argv, "--out", str(tmp_path / "compiled.parquet"), "--compile"]) == 0
    assert counters["stats"]["unique_graphs"] >= 2  # the flag really reached torch.compile
    eager, compiled = (
        read_slide_embeddings(tmp_path / "eager.parquet"),
        read_slide_embeddings(tmp_path / "compiled.parquet"),
    )
    assert compiled["slide_id"].tolist() == eager["slide_id"].tolist()
    np.testing.assert_allclose(np.stack(compiled["embedding"]), np.stack(eager["embedding"]), rtol=1e-5, atol=1e-5)


def _recorded_as(path: Path, encoder: str) -> None:
    with h5py.File(path, "r+") as h5:
        h5.attrs["encoder"] = encoder


def test_a_folder_mixing_tile_encoders_is_refused_naming_the_odd_files(
    features_dir: Path, checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Features of another tile encoder of the same width mixed into the folder: embed-slides exited 0, and
    those slides' embeddings were meaningless."""
    import logging

    for path in features_dir.glob("*.h5"):
        _recorded_as(path, "timm:vit_small_patch16_224")
    _recorded_as(features_dir / "slide-1.h5", "timm:resnet50")
    out = tmp_path / "slides.parquet"
    argv = ["embed-slides", str(features_dir), "--out", str(out), "--slide-encoder", "tiny", "--checkpoint",
            str(checkpoint), "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "slide-1.h5 ('timm:resnet50')" in errors[0], errors
    assert "2 record 'timm:vit_small_patch16_224'" in errors[0] and not out.exists()
    _recorded_as(features_dir / "slide-1.h5", "timm:vit_small_patch16_224")
    assert main(argv) == 0
    from vlm.formats.embeddings import read_embedding_settings

    assert read_embedding_settings(out)["tile_encoder"] == "timm:vit_small_patch16_224"
    _recorded_as(features_dir / "slide-1.h5", "timm:resnet50")  # a resumed run into that file is refused too
    (features_dir / "slide-2.h5").unlink()
    assert main([*argv, "--overwrite"]) == 2


def test_files_without_a_recorded_encoder_are_warned_about_not_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """CLAM files record no encoder; they stay usable, with a warning that says what is not checked."""
    from vlm.encoders.slide_inputs import check_tile_encoders

    folder = tmp_path / "features"
    folder.mkdir()
    paths = [_write_slide(folder, f"s{i}", 20, seed=i) for i in range(3)]
    with h5py.File(paths[0], "r+") as h5:
        del h5.attrs["encoder"]
    assert check_tile_encoders(paths, "tiny") == "test"
    assert "1 feature file(s) record no tile encoder (s0.h5" in caplog.text


def test_the_gigapath_slide_encoder_refuses_features_of_another_tile_encoder(tmp_path: Path) -> None:
    """Prov-GigaPath's slide encoder was trained on its own tile encoder's 1536-d features; 1536-d features of
    another encoder gave embeddings with no error. TRIDENT names that tile encoder `gigapath` as vlm does."""
    from vlm.encoders.slide_inputs import check_tile_encoders

    folder = tmp_path / "features"
    folder.mkdir()
    coords = trident_grid(4, 4, level0_magnification=40)
    trident = folder / "trident.h5"
    write_trident_features(trident, coords, np.zeros((16, 1536), np.float32), 40, encoder="gigapath")
    assert check_tile_encoders([trident], "gigapath") == "gigapath"
    mine = _write_slide(folder, "mine", 20, seed=0, dim=1536)
    _recorded_as(mine, "timm:vit_giant_patch14_dinov2.lvd142m")
    with pytest.raises(ValueError, match=r"'gigapath' slide encoder was trained on 'gigapath' tile features, but "
                       r"mine.h5 record 'timm:vit_giant_patch14_dinov2.lvd142m'"):
        check_tile_encoders([mine], "gigapath")
    with pytest.raises(ValueError, match="record tile encoder 'gigapath', but the model's slide embeddings were "
                       "made from 'timm:resnet50'"):
        check_tile_encoders([trident], source={"encoder": "custom", "tile_encoder": "timm:resnet50"})

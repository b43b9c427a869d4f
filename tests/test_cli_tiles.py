"""`vlm tile` and `vlm embed-tiles` end to end through the CLI: outputs, resume, sharding, bad input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.synthetic import TISSUE_05, tissue_image
from vlm.batch import Shard
from vlm.cli import main
from vlm.formats.features import read_features, read_tile_grid
from vlm.wsi.synthetic import write_pyramidal_tiff


def failures(folder: Path, suffix: str = "") -> dict[str, str]:
    with open(folder / f"failures{suffix}.csv") as handle:
        return {row["slide"]: row["error"] for row in csv.DictReader(handle)}


@pytest.fixture()
def bad_slides(tmp_path: Path, real_slide: Path) -> Path:
    """A folder with one good slide and every kind of bad input the batch must survive."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    shutil.copy(real_slide, folder / "good.svs")
    (folder / "report.svs").write_text("not a slide")
    (folder / "truncated.svs").write_bytes(real_slide.read_bytes()[:50_000])
    write_pyramidal_tiff(folder / "white.tiff", (1024, 1024), np.full((1024, 1024, 3), 250, np.uint8), mpp=0.5)
    write_pyramidal_tiff(folder / "no_mpp.tiff", (1024, 1024), tissue_image(1024, 1024, (256, 256, 768, 768)),
                         mpp=None)
    return folder


def test_tile_writes_grid_and_thumbnail(tmp_path: Path, real_slide: Path, slide_05: Path) -> None:
    out = tmp_path / "tiles"
    assert main(["tile", str(real_slide), str(slide_05), "--out", str(out), "--no-progress"]) == 0
    grid = read_tile_grid(out / "synthetic_05.h5")
    assert len(grid) == 8 and grid.mpp == 0.5 and grid.tile_size_level0 == 256
    thumbnail = Image.open(out / "cmu_small_region.png")
    assert max(thumbnail.size) == 1024
    assert not (out / "failures.csv").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cmu_small_region.h5", "cmu_small_region.png", "synthetic_05.h5", "synthetic_05.png"])


def test_bad_slides_fail_clearly_and_the_batch_goes_on(tmp_path: Path, bad_slides: Path) -> None:
    out = tmp_path / "tiles"
    assert main(["tile", str(bad_slides), "--out", str(out), "--no-progress", "--workers", "2"]) == 1
    errors = failures(out)
    assert set(errors) == {"report", "truncated", "white", "no_mpp"}
    assert "not a slide" in errors["report"] and "report.svs" in errors["report"]
    assert "truncated.svs" in errors["truncated"]
    assert "no tissue" in errors["white"]
    assert "--mpp" in errors["no_mpp"]
    # no output for a failed slide, not even a temporary one
    assert sorted(p.name for p in out.iterdir()) == ["failures.csv", "good.h5", "good.png"]
    # the --mpp fix for the slide without mpp
    assert main(["tile", str(bad_slides / "no_mpp.tiff"), "--mpp", "0.5", "--out", str(out), "--no-progress"]) == 0
    assert read_tile_grid(out / "no_mpp.h5").mpp == 0.5


def test_resume_does_every_slide_once(tmp_path: Path, real_slide: Path, slide_05: Path, slide_025: Path) -> None:
    out = tmp_path / "tiles"
    assert main(["tile", str(slide_05), "--out", str(out), "--no-progress"]) == 0
    done_before = (out / "synthetic_05.h5").stat().st_mtime_ns
    # what a kill mid-write leaves behind: a temporary file, which must not count as done
    (out / ".synthetic_025.h5.abc.part").write_bytes(b"partial")
    from vlm.tile import tile_slides

    report = tile_slides([slide_05, slide_025, real_slide], out, progress=False)
    assert report.skipped == ["synthetic_05"]
    assert sorted(report.done) == ["cmu_small_region", "synthetic_025"]
    assert (out / "synthetic_05.h5").stat().st_mtime_ns == done_before
    assert tile_slides([slide_05, slide_025, real_slide], out, progress=False).done == []


def test_resume_redoes_a_damaged_output(tmp_path: Path, slide_05: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cut-short `<slide>.h5` in --out (a copy interrupted) counted as done: "0 done, 1 skipped", exit 0,
    and the next stage failed on it."""
    from vlm.tile import tile_slides

    out = tmp_path / "tiles"
    assert tile_slides([slide_05], out, progress=False).done == ["synthetic_05"]
    good = (out / "synthetic_05.h5").read_bytes()
    (out / "synthetic_05.h5").write_bytes(good[: len(good) // 2])
    assert tile_slides([slide_05], out, progress=False).done == ["synthetic_05"]
    assert "synthetic_05.h5: not a readable HDF5 file" in caplog.text and "it is redone" in caplog.text
    assert len(read_tile_grid(out / "synthetic_05.h5")) > 0


def test_shards_split_the_slides_without_overlap(tmp_path: Path) -> None:
    names = [Path(f"s{i}.svs") for i in range(7)]
    parts = [Shard(i, 3).select(names, key=str) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(names)
    assert all(not set(a) & set(b) for a in parts for b in parts if a is not b)
    assert Shard.parse("1/3") == Shard(1, 3)
    with pytest.raises(ValueError, match="i/n"):
        Shard.parse("3")
    with pytest.raises(ValueError, match="0 <= i < n"):
        Shard.parse("3/3")


def test_torchrun_environment_selects_the_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert Shard.parse(None) == Shard(2, 4)


def test_unwritable_out_and_missing_inputs_exit_non_zero(tmp_path: Path, slide_05: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    assert main(["tile", str(slide_05), "--out", str(blocker / "tiles"), "--no-progress"]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["tile", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_embed_tiles_with_a_real_timm_vit_through_dataloader_workers(
    tmp_path: Path, slide_05: Path, tiny_vit_checkpoint: Path
) -> None:
    tiles, out = tmp_path / "tiles", tmp_path / "features"
    assert main(["tile", str(slide_05), "--out", str(tiles), "--no-progress"]) == 0
    args = ["embed-tiles", str(slide_05), "--out", str(out), "--tile-encoder", "timm:vit_tiny_patch16_224",
            "--checkpoint", str(tiny_vit_checkpoint), "--device", "cpu", "--batch-size", "3", "--workers", "2",
            "--no-progress"]
    assert main([*args, "--tiles", str(tiles)]) == 0
    features = read_features(out / "synthetic_05.h5")
    assert features.features.shape == (8, 192) and features.features.dtype == np.float32
    assert np.isfinite(features.features).all()
    assert features.encoder == "timm:vit_tiny_patch16_224"
    np.testing.assert_array_equal(features.coords, read_tile_grid(tiles / "synthetic_05.h5").coords)
    # same tiles, same model, through the PIL transform in one batch in this process: the same features in grid
    # order, up to the stream's tensor resize (within 2 grey levels of PIL's, see tests/test_tile_features.py)
    import torch

    from vlm.encoders.tile import create_tile_encoder
    from vlm.wsi.dataset import TileDataset
    from vlm.wsi.slide import open_slide
    from vlm.wsi.tiling import read_plan

    encoder = create_tile_encoder("timm:vit_tiny_patch16_224", checkpoint=tiny_vit_checkpoint)
    with open_slide(slide_05) as slide:
        plan = read_plan(slide, 256, 256)
    dataset = TileDataset(slide_05, features.coords, plan, 0.5, transform=encoder.transform)
    with torch.inference_mode():
        direct = encoder(torch.stack([dataset[i][0] for i in range(len(dataset))])).numpy()
    norms = np.linalg.norm(features.features, axis=1) * np.linalg.norm(direct, axis=1)
    cosine = (features.features * direct).sum(1) / norms
    assert cosine.min() > 0.9999, cosine
    np.testing.assert_allclose(features.features, direct, rtol=1e-3, atol=1e-3)
    # without --tiles the grid is computed on the fly: same file content
    assert main([*args, "--out", str(tmp_path / "f2")]) == 0
    np.testing.assert_allclose(read_features(tmp_path / "f2" / "synthetic_05.h5").features, features.features,
                               rtol=1e-5, atol=1e-5)


def test_embed_tiles_shards_write_disjoint_files(tmp_path: Path, slide_05: Path, real_slide: Path) -> None:
    from vlm.encoders.tile import create_tile_encoder
    from vlm.tile_features import embed_tiles

    encoder = create_tile_encoder("gigapath", pretrained=False, embed_dim=48, depth=1, num_heads=2)
    import torch

    written = []
    for index in range(2):
        report = embed_tiles([slide_05, real_slide], tmp_path, encoder, torch.device("cpu"), workers=0,
                             shard=Shard(index, 2), progress=False)
        written.append(report.done)
    assert sorted(sum(written, [])) == ["cmu_small_region", "synthetic_05"]
    assert all(len(done) == 1 for done in written)
    tissue_tiles = read_features(tmp_path / "synthetic_05.h5")
    x0, y0, _, _ = TISSUE_05
    assert tuple(tissue_tiles.coords[0]) == (x0, y0)


def test_a_240_character_slide_name_is_tiled(tmp_path: Path, slide_05: Path) -> None:
    """`<id>.h5` fits the 255-byte name limit, but its temporary `.<id>.h5.<random>.part` did not: the slide
    failed with "File name too long"."""
    slide_id = "S" * 240
    slide = tmp_path / f"{slide_id}.tiff"
    shutil.copy(slide_05, slide)
    out = tmp_path / "tiles"
    assert main(["tile", str(slide), "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [f"{slide_id}.h5", f"{slide_id}.png"]
    assert read_tile_grid(out / f"{slide_id}.h5").coords.shape[0] > 0
    assert not list(out.glob(".*.part"))


@pytest.mark.parametrize("name", ["...tiff", "..tiff", ".ome.tiff"])
def test_a_file_name_that_leaves_no_slide_id_is_refused(
    tmp_path: Path, slide_05: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`...tiff` had the id `..`: its grid was `<out>/...h5` and its viewer link `/slide/..` opened the search
    page. The whole run is refused before any slide is read, naming the file."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    shutil.copy(slide_05, folder / "good.tiff")
    shutil.copy(slide_05, folder / name)
    out = tmp_path / "tiles"
    assert main(["tile", str(folder), "--out", str(out), "--no-progress"]) == 2
    assert f"{folder / name}: the file name leaves the slide id" in caplog.text and "rename the file" in caplog.text
    assert not out.exists() or not any(out.rglob("*.h5"))

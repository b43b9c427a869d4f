"""The continuous tile stream of `vlm embed-tiles` and the encoder transform on tensors.

The reference everywhere is the plain per-slide computation in this process: `TileDataset` tiles through the
encoder's PIL transform, stacked, one forward pass. The stream must give those features (<= 1e-4 where no
resize happens; cosine >= 0.999 per tile where the tensor resize replaces PIL's), for one slide and a cohort,
with batches that span slide boundaries, through real DataLoader worker processes and real OpenSlide reads.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from tests.support.encoders import tiny_gigapath
from tests.support.synthetic import textured_tiles, tissue_image
from vlm.encoders.tile import TileEncoder, create_tile_encoder, tensor_transform
from vlm.formats.features import read_features
from vlm.tile_features import embed_grid, embed_tiles
from vlm.wsi.dataset import TileDataset
from vlm.wsi.slide import open_slide
from vlm.wsi.synthetic import write_pyramidal_tiff
from vlm.wsi.tiling import TilingParams, read_plan, tile_slide

CPU = torch.device("cpu")


@torch.inference_mode()
def per_slide_features(slide: Path, encoder: TileEncoder) -> np.ndarray:
    """The reference: every tile of the slide's grid through the PIL transform, encoded in one batch."""
    with open_slide(slide) as opened:
        grid = tile_slide(opened, TilingParams()).grid
        plan = read_plan(opened, grid.tile_size_level0, grid.tile_size)
    dataset = TileDataset(slide, grid.coords, plan, grid.mpp, transform=encoder.transform)
    return encoder(torch.stack([dataset[i][0] for i in range(len(dataset))])).numpy()


def cosine_per_row(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("name", ["gigapath", "timm:vit_tiny_patch16_224", "timm:resnet18"])
@pytest.mark.parametrize("size", [256, 300, 512, 200])
def test_tensor_transform_is_the_pil_transform(name: str, size: int) -> None:
    encoder = tiny_gigapath() if name == "gigapath" else create_tile_encoder(name, pretrained=False)
    device_transform = tensor_transform(encoder.transform)
    assert device_transform is not None
    tiles = textured_tiles(3, size, seed=size)
    reference = torch.stack([encoder.transform(Image.fromarray(tile)) for tile in tiles])
    ours = device_transform(torch.from_numpy(tiles))
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    # PIL rounds to uint8 between its two resize passes; we do the same: grey levels apart only by rounding
    levels = ((ours - reference) * torch.as_tensor(encoder.transform.transforms[-1].std).view(3, 1, 1) * 255).abs()
    assert levels.max().item() <= 2 + 1e-3
    assert levels.mean().item() <= 0.02
    if name == "gigapath" and size == 256:  # Resize(256) of a 256-px tile is skipped on both paths: identical
        assert torch.equal(ours, reference)
    with torch.inference_mode():
        cosine = cosine_per_row(encoder(ours).numpy(), encoder(reference).numpy())
    assert cosine.min() >= 0.999


def test_a_transform_without_a_tensor_twin_runs_in_the_workers(slide_05: Path) -> None:
    encoder = tiny_gigapath()
    encoder.transform = transforms.Compose([transforms.RandomGrayscale(p=0.0), *encoder.transform.transforms])
    assert tensor_transform(encoder.transform) is None
    with open_slide(slide_05) as slide:
        grid = tile_slide(slide).grid
    features = embed_grid(slide_05, grid, encoder, CPU, batch_size=3, workers=1)
    np.testing.assert_allclose(features, per_slide_features(slide_05, encoder), atol=1e-4, rtol=0)


def test_stream_gives_the_per_slide_features_for_one_slide(slide_05: Path) -> None:
    encoder = tiny_gigapath()
    with open_slide(slide_05) as slide:
        grid = tile_slide(slide).grid
    reference = per_slide_features(slide_05, encoder)
    assert np.abs(reference[1:] - reference[:-1]).max(axis=1).min() > 1e-2  # a mix-up of tiles would show
    cases = [(0, 64, 16, None), (2, 5, 2, "device"), (3, 4, 1, "workers"), (2, 6, 3, "device")]
    for workers, batch_size, chunk_size, transform_on in cases:  # batches of several chunks, both transform places
        features = embed_grid(slide_05, grid, encoder, CPU, batch_size=batch_size, workers=workers,
                              chunk_size=chunk_size, transform_on=transform_on)
        np.testing.assert_allclose(features, reference, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_stream_gives_the_per_slide_features_for_a_cohort(
    tmp_path: Path, slide_05: Path, slide_025: Path, real_slide: Path
) -> None:
    """Three slides, batches of 5 tiles spanning slide boundaries, two reading workers, a failing slide between."""
    cohort = [slide_05, slide_025, real_slide]
    (tmp_path / "broken.svs").write_text("not a slide")
    for name, check in [("gigapath", "exact"), ("timm:vit_tiny_patch16_224", "cosine")]:
        encoder = tiny_gigapath() if name == "gigapath" else create_tile_encoder(name, pretrained=False)
        out = tmp_path / name.replace(":", "_")
        report = embed_tiles(
            [*cohort, tmp_path / "broken.svs"], out, encoder, CPU, batch_size=5, workers=2, progress=False
        )
        assert sorted(report.done) == sorted(path.stem for path in cohort)
        assert [slide for slide, _ in report.failed] == ["broken"]
        with open(out / "failures.csv") as handle:
            (row,) = list(csv.DictReader(handle))
        assert row["slide"] == "broken" and "not a slide OpenSlide can read" in row["error"]
        for slide in cohort:
            features = read_features(out / f"{slide.stem}.h5")
            reference = per_slide_features(slide, encoder)
            assert features.features.shape == reference.shape
            if check == "exact":
                np.testing.assert_allclose(features.features, reference, atol=1e-4, rtol=0)
            else:  # the tensor resize (256 -> 248 px) equals PIL's to one grey level
                assert cosine_per_row(features.features, reference).min() >= 0.999


@pytest.mark.slow
def test_a_killed_cohort_run_resumes_to_the_same_features(tmp_path: Path, tiny_vit_checkpoint: Path) -> None:
    """SIGKILL `vlm embed-tiles` once some slides are written; the rerun does the rest, the outputs are whole."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for index in range(8):
        box = (256, 256, 1792, 1792 - 256 * (index % 3))
        write_pyramidal_tiff(
            cohort / f"slide_{index}.tiff",
            (2048, 2048),
            tissue_image(2048, 2048, box, seed=index),
            mpp=0.5,
            compression=None,
        )
    args = [
        sys.executable,
        "-m",
        "vlm",
        "embed-tiles",
        str(cohort),
        "--tile-encoder",
        "timm:vit_tiny_patch16_224",
        "--checkpoint",
        str(tiny_vit_checkpoint),
        "--device",
        "cpu",
        "--batch-size",
        "8",
        "--workers",
        "2",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    process = subprocess.Popen([*args, "--out", str(out)], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*.h5")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)  # the CLI and its DataLoader workers, mid-cohort
    finally:
        process.wait()
    written = sorted(path.name for path in out.glob("*.h5"))
    assert 1 <= len(written) < 8, f"the kill should land mid-cohort, but {len(written)} slides were written"
    for name in written:  # atomic writes: whatever exists is complete
        assert read_features(out / name).features.shape[0] > 0
    rerun = subprocess.run([*args, "--out", str(out)], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{8 - len(written)} done, {len(written)} skipped (already done), 0 failed" in rerun.stdout
    clean = tmp_path / "clean"
    assert subprocess.run([*args, "--out", str(clean)], env=env).returncode == 0
    assert sorted(path.name for path in out.glob("*.h5")) == sorted(path.name for path in clean.glob("*.h5"))
    assert len(list(clean.glob("*.h5"))) == 8
    assert not [path for path in out.iterdir() if path.suffix != ".h5"]  # no temporary files left behind
    for name in written:  # the rerun skipped what the killed run finished; the rest match a clean run
        np.testing.assert_allclose(
            read_features(out / name).features, read_features(clean / name).features, atol=1e-5, rtol=0
        )
    for path in clean.glob("*.h5"):
        np.testing.assert_allclose(
            read_features(out / path.name).features, read_features(path).features, atol=1e-5, rtol=0
        )


def test_a_dying_reader_fails_the_slides_in_flight_and_the_stream_goes_on(
    tmp_path: Path, slide_05: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reading process that dies (as in a crash inside a slide library) fails only the slides in flight."""
    cohort = []
    for name in ["a", "b", "c", "d"]:
        cohort.append(tmp_path / f"{name}.tiff")
        cohort[-1].write_bytes(slide_05.read_bytes())
    read_tile = TileDataset.read_tile_array  # what the stream reads uint8 tiles with

    def dies_on_b(self: TileDataset, index: int) -> np.ndarray:
        if self.slide_path.stem == "b":
            os._exit(1)  # the forked worker process dies on the spot
        return read_tile(self, index)

    monkeypatch.setattr(TileDataset, "read_tile_array", dies_on_b)
    encoder = tiny_gigapath()
    report = embed_tiles(cohort, tmp_path / "out", encoder, CPU, batch_size=8, workers=2, progress=False)
    failed = dict(report.failed)
    assert "b" in failed and "worker process died" in failed["b"]
    assert {"c", "d"} <= set(report.done)
    assert set(report.done) | set(failed) == {"a", "b", "c", "d"}
    assert sorted(path.stem for path in (tmp_path / "out").glob("*.h5")) == sorted(report.done)
    monkeypatch.setattr(TileDataset, "read_tile_array", read_tile)
    rerun = embed_tiles(cohort, tmp_path / "out", encoder, CPU, batch_size=8, workers=2, progress=False)
    assert sorted(rerun.done) == sorted(failed) and rerun.ok
    reference = per_slide_features(slide_05, encoder)
    for name in "abcd":
        np.testing.assert_allclose(read_features(tmp_path / "out" / f"{name}.h5").features, reference, atol=1e-4)


def test_overwrite_and_skip_keep_their_meaning(tmp_path: Path, slide_05: Path) -> None:
    encoder = tiny_gigapath()
    first = embed_tiles([slide_05], tmp_path, encoder, CPU, workers=0, progress=False)
    assert first.done == ["synthetic_05"]
    assert embed_tiles([slide_05], tmp_path, encoder, CPU, workers=0, progress=False).skipped == ["synthetic_05"]
    redone = embed_tiles([slide_05], tmp_path, encoder, CPU, workers=0, progress=False, overwrite=True)
    assert redone.done == ["synthetic_05"]


def test_a_nan_output_fails_its_slide_and_writes_nothing(tmp_path: Path, slide_05: Path) -> None:
    """Non-finite tile features (a broken checkpoint, an fp16 overflow) fail the slide instead of being written."""
    encoder = tiny_gigapath()
    with torch.no_grad():
        next(p for name, p in encoder.model.named_parameters() if name.endswith("norm.weight")).fill_(float("nan"))
    report = embed_tiles([slide_05], tmp_path, encoder, CPU, workers=0, progress=False)
    assert report.done == [] and [slide for slide, _ in report.failed] == ["synthetic_05"]
    assert "NaN/inf" in report.failed[0][1] and not (tmp_path / "synthetic_05.h5").exists()
    assert "synthetic_05" in (tmp_path / "failures.csv").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stream_matches_the_cpu_stream(slide_05: Path) -> None:
    encoder = tiny_gigapath()
    with open_slide(slide_05) as slide:
        grid = tile_slide(slide).grid
    cpu = embed_grid(slide_05, grid, encoder, CPU, batch_size=4, workers=2)
    cuda = embed_grid(slide_05, grid, encoder, torch.device("cuda"), precision="fp32", batch_size=4, workers=2)
    np.testing.assert_allclose(cuda, cpu, atol=1e-3, rtol=0)
    compiled = embed_grid(slide_05, grid, encoder, torch.device("cuda"), precision="fp32", batch_size=3, workers=2,
                          compile=True)
    np.testing.assert_allclose(compiled, cpu, atol=1e-3, rtol=0)  # the padded last batch is cut off again
    tiles = torch.from_numpy(textured_tiles(4, 300))
    device_transform = tensor_transform(encoder.transform)
    np.testing.assert_allclose(
        device_transform(tiles.cuda()).cpu().numpy(), device_transform(tiles).numpy(), atol=2 / 255 / 0.224
    )

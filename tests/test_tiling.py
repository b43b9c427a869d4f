"""Tissue detection, tile grids and tile reading on real and generated slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.synthetic import TISSUE_025, TISSUE_05, tissue_image
from vlm.wsi.dataset import TileDataset
from vlm.wsi.slide import open_slide
from vlm.wsi.synthetic import write_pyramidal_tiff
from vlm.wsi.tiling import NoTissueError, TilingParams, read_plan, tile_slide
from vlm.wsi.tissue import tissue_mask_from_rgb


def expected_tiles(box: tuple[int, int, int, int], size: int) -> set[tuple[int, int]]:
    x0, y0, x1, y1 = box
    return {(x, y) for x in range(x0, x1, size) for y in range(y0, y1, size)}


def test_grid_matches_known_tissue_at_05_mpp(slide_05: Path) -> None:
    with open_slide(slide_05) as slide:
        result = tile_slide(slide)
    grid = result.grid
    assert grid.tile_size_level0 == 256 and grid.tile_size == 256 and grid.target_mpp == 0.5
    assert grid.coords.dtype == np.int64
    assert {tuple(c) for c in grid.coords} == expected_tiles(TISSUE_05, 256)


def test_025_mpp_slide_gives_512_px_level0_tiles(slide_025: Path) -> None:
    with open_slide(slide_025) as slide:
        grid = tile_slide(slide).grid
        plan = read_plan(slide, grid.tile_size_level0, grid.tile_size)
    assert grid.tile_size_level0 == 512
    assert {tuple(c) for c in grid.coords} == expected_tiles(TISSUE_025, 512)
    # level 1 (downsample 2) holds the 0.5-mpp pixels: read there, 256 px, no resampling
    assert (plan.level, plan.read_size, plan.needs_resize) == (1, 256, False)


def test_single_level_025_slide_reads_512_and_resizes(tmp_path: Path) -> None:
    path = tmp_path / "flat_025.tiff"
    image = tissue_image(2048, 2048, (512, 512, 1536, 1536))
    write_pyramidal_tiff(path, (2048, 2048), image, mpp=0.25, n_levels=1, compression=None)
    with open_slide(path) as slide:
        grid = tile_slide(slide).grid
        plan = read_plan(slide, grid.tile_size_level0, grid.tile_size)
    assert (plan.level, plan.read_size, plan.tile_size) == (0, 512, 256)
    tile = TileDataset(path, grid.coords, plan, grid.mpp).read_tile(0)
    assert tile.size == (256, 256)


def test_tile_at_stored_coordinate_returns_the_source_pixels(slide_05: Path) -> None:
    source = tissue_image(2048, 1536, TISSUE_05)
    with open_slide(slide_05) as slide:
        grid = tile_slide(slide).grid
        plan = read_plan(slide, grid.tile_size_level0, grid.tile_size)
    dataset = TileDataset(slide_05, grid.coords, plan, grid.mpp)
    for index in (0, len(dataset) - 1):
        x, y = grid.coords[index]
        np.testing.assert_array_equal(np.asarray(dataset.read_tile(index)), source[y : y + 256, x : x + 256])


def test_jpeg_pyramid_tile_matches_downsampled_source(slide_025: Path) -> None:
    source = tissue_image(4096, 3072, TISSUE_025, seed=1).astype(np.float32)
    with open_slide(slide_025) as slide:
        grid = tile_slide(slide).grid
        plan = read_plan(slide, grid.tile_size_level0, grid.tile_size)
    x, y = grid.coords[0]
    tile = np.asarray(TileDataset(slide_025, grid.coords, plan, grid.mpp).read_tile(0), np.float32)
    expected = source[y : y + 512, x : x + 512].reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(tile.mean(axis=(0, 1)) - expected.mean(axis=(0, 1))).max() < 3  # JPEG: colour kept


def test_real_slide_tiles_cover_tissue_not_background(real_slide: Path) -> None:
    with open_slide(real_slide) as slide:
        result = tile_slide(slide)
        plan = read_plan(slide, result.grid.tile_size_level0, result.grid.tile_size)
        thumbnail = slide.read_level_rgb(0)
    grid = result.grid
    assert 30 <= len(grid) <= 80
    assert grid.tile_size_level0 == round(256 * 0.5 / 0.499)
    # every kept tile is stained (non-white) on average; every dropped tile in a white row is not kept
    dataset = TileDataset(real_slide, grid.coords, plan, grid.mpp)
    mean_kept = np.mean([np.asarray(dataset.read_tile(i)).mean() for i in range(len(grid))])
    size = grid.tile_size_level0
    kept = {tuple(c) for c in grid.coords}
    dropped_means = [
        thumbnail[y : y + size, x : x + size].mean()
        for y in range(0, thumbnail.shape[0] - size + 1, size)
        for x in range(0, thumbnail.shape[1] - size + 1, size)
        if (x, y) not in kept
    ]
    assert mean_kept < 200 < np.median(dropped_means)
    assert 0.2 < result.tissue.fraction < 0.6


def test_all_white_slide_has_no_tissue(tmp_path: Path) -> None:
    path = tmp_path / "white.tiff"
    write_pyramidal_tiff(path, (1024, 1024), np.full((1024, 1024, 3), 250, np.uint8), mpp=0.5)
    with open_slide(path) as slide, pytest.raises(NoTissueError, match=r"white\.tiff.*no tissue"):
        tile_slide(slide)


def test_min_tissue_fraction_is_applied(tmp_path: Path) -> None:
    # Tissue over the left half of two tiles: kept at min_tissue 0.4, not at 0.6.
    path = tmp_path / "half.tiff"
    write_pyramidal_tiff(path, (1024, 1024), tissue_image(1024, 1024, (512, 512, 640, 1024)), mpp=0.5,
                         compression=None)
    with open_slide(path) as slide:
        grid = tile_slide(slide, TilingParams(min_tissue=0.4)).grid
        assert {tuple(c) for c in grid.coords} == {(512, 512), (512, 768)}
        with pytest.raises(NoTissueError):
            tile_slide(slide, TilingParams(min_tissue=0.6))


def test_tissue_mask_separates_stain_from_glass() -> None:
    rgb = np.full((64, 64, 3), 245, np.uint8)
    rgb[:, :24] = (200, 110, 170)
    mask, threshold = tissue_mask_from_rgb(rgb)
    assert mask[:, :24].all() and not mask[:, 24:].any()
    assert threshold >= 20


def test_tiling_params_validated() -> None:
    with pytest.raises(ValueError, match="`min_tissue`"):
        TilingParams(min_tissue=1.5)
    with pytest.raises(ValueError, match="`target_mpp`"):
        TilingParams(target_mpp=0)


def _slide_region(downsample: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """Level-0 tiles of an 8,192² slide made on the fly (the test never holds the slide): pink noise in a
    disc of radius 3,000 px around the centre, glass outside."""
    rng = np.random.default_rng(y0 * 7919 + x0)
    ys, xs = np.mgrid[y0 : y0 + height, x0 : x0 + width]
    inside = (ys - 4096) ** 2 + (xs - 4096) ** 2 < 3000**2
    tile = np.full((height, width, 3), 245, np.uint8)
    noise = rng.integers(-25, 25, size=(height, width, 1))
    tile[inside] = np.clip(np.array([200, 110, 170]) + noise, 0, 255).astype(np.uint8)[inside]
    return tile


def test_a_slide_without_a_pyramid_is_tiled_in_bounded_memory(tmp_path: Path) -> None:
    """`vlm tile` on a one-level TIFF read all of level 0 for the tissue mask and the QC thumbnail: 1.9 GB for
    12,288² px (0.14 GB with a pyramid). Now the level is read in strips of `STRIP_PIXELS`: the run's peak RSS
    above the process's own stays under 150 MB on an 8,192² one-level slide (reading the level whole took 0.8 GB
    above it: 67 Mpx as OpenSlide's RGBA buffer, PIL's copy and the RGB image).
    Measured in a fresh process, with the real CLI."""
    import subprocess
    import sys

    slide = tmp_path / "flat.tiff"
    write_pyramidal_tiff(slide, (8192, 8192), _slide_region, mpp=0.5, n_levels=1, tile=512)
    out = tmp_path / "tiles"
    # VmHWM, the peak RSS of this process image (ru_maxrss would carry pytest's own peak across the exec)
    code = (
        "import re; from vlm.cli import main; import vlm.wsi.tiling, openslide; "
        "mb = lambda key: int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024; "
        "before = mb('VmRSS'); "
        f"assert main(['tile', {str(slide)!r}, '--out', {str(out)!r}, '--no-progress']) == 0; "
        "print(mb('VmHWM') - before)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    peak_mb = float(result.stdout.strip().splitlines()[-1])
    assert peak_mb < 150, f"peak {peak_mb:.0f} MB above the process's own"
    from vlm.formats.features import read_tile_grid

    coords = read_tile_grid(out / "flat.h5").coords + 128
    distance = np.sqrt(((coords - 4096) ** 2).sum(axis=1))  # tile centres
    assert distance.max() < 3000 + 182 and len(coords) > 0.9 * np.pi * 3000**2 / 256**2  # the disc, tiled


def test_the_tissue_mask_read_in_strips_is_the_mask_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Strips (each resized onto its rows of the mask grid) give the tiles and mask of a whole read."""
    from vlm.wsi import tissue

    slide = tmp_path / "one_level.tiff"
    write_pyramidal_tiff(slide, (2048, 1536), tissue_image(2048, 1536, TISSUE_05), mpp=0.5, n_levels=1,
                         compression=None)
    with open_slide(slide) as opened:
        whole = tile_slide(opened)
        monkeypatch.setattr(tissue, "STRIP_PIXELS", 2048 * 100)  # 8 strips of ~100 level rows
        strips = tile_slide(opened)
    assert np.array_equal(whole.tissue.thumbnail, strips.tissue.thumbnail)
    assert np.array_equal(whole.tissue.mask, strips.tissue.mask)
    assert np.array_equal(whole.grid.coords, strips.grid.coords)


def test_the_tissue_mask_of_a_pyramid_is_unchanged(slide_025: Path) -> None:
    """On a pyramid the mask is still the best level read whole and resized onto the mask grid (as before)."""
    from PIL import Image

    from vlm.wsi.tissue import detect_tissue

    with open_slide(slide_025) as slide:
        downsample = 32.0
        level = slide.best_level_for_downsample(downsample)
        assert level > 0
        size = (int(np.ceil(slide.dimensions[0] / downsample)), int(np.ceil(slide.dimensions[1] / downsample)))
        before = np.asarray(Image.fromarray(slide.read_level_rgb(level)).resize(size, Image.Resampling.BILINEAR))
        expected, _ = tissue_mask_from_rgb(before)
        found = detect_tissue(slide, downsample)
    assert np.array_equal(found.thumbnail, before) and np.array_equal(found.mask, expected)

"""Pixel readers (`vlm.wsi.readers`): the tifffile reader returns OpenSlide's pixels, `auto` falls back.

Tolerance: none. On every fixture below (the Aperio CMU slide, openslide-python's small.svs and boxes.tiff,
the generated JPEG and uncompressed pyramids) the tifffile reader's pixels equal OpenSlide's exactly (max
|difference| 0): both decode the same JPEG tiles with libjpeg-turbo (openslide-bin and imagecodecs each bundle
it) with the same colour handling. An exact test is what makes "same features" a fact; a decoder update that
rounds apart shows here first, and `--reader openslide` stays as the reference.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
from PIL import Image

from tests.support.encoders import tiny_gigapath
from vlm.cli import main
from vlm.tile_features import embed_grid
from vlm.wsi.readers import ReaderUnavailableError
from vlm.wsi.slide import Slide, SlideReadError, open_slide, rgba_to_rgb
from vlm.wsi.tiling import tile_slide

FIXTURES = Path(__file__).parent / "fixtures" / "openslide-python"
CPU = torch.device("cpu")


def pil_rgb(rgba: Image.Image) -> np.ndarray:
    """vlm's conversion before the tifffile reader (kept here as the reference): paste onto white by alpha."""
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return np.asarray(rgba.convert("RGB"))
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=alpha)
    return np.asarray(background)


def test_rgba_to_rgb_is_the_pil_paste_for_every_colour_and_alpha() -> None:
    value, alpha = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    rgba = np.stack([value, 255 - value, value // 2, alpha], axis=-1)  # [256, 256, 4]: every (colour, alpha)
    np.testing.assert_array_equal(rgba_to_rgb(rgba), pil_rgb(Image.fromarray(rgba, "RGBA")))
    opaque = rgba.copy()
    opaque[..., 3] = 255
    np.testing.assert_array_equal(rgba_to_rgb(opaque), opaque[..., :3])


def _slides(real_slide: Path, slide_05: Path, slide_025: Path) -> list[tuple[Path, float | None]]:
    return [(real_slide, None), (FIXTURES / "small.svs", None), (FIXTURES / "boxes.tiff", 0.25),
            (slide_05, None), (slide_025, None)]


def test_tifffile_reads_the_pixels_openslide_reads(real_slide: Path, slide_05: Path, slide_025: Path) -> None:
    """Whole levels, windows across tile borders and windows leaving the slide (white), on every fixture."""
    rng = np.random.default_rng(0)
    for path, mpp in _slides(real_slide, slide_05, slide_025):
        with Slide(path, mpp=mpp, reader="tifffile") as fast, Slide(path, mpp=mpp, reader="openslide") as ref:
            assert (fast.reader, ref.reader) == ("tifffile", "openslide")
            raw = openslide.OpenSlide(str(path))
            for level, (width, height) in enumerate(ref.level_dimensions):
                ds = ref.level_downsamples[level]
                np.testing.assert_array_equal(fast.read_level_rgb(level), ref.read_level_rgb(level), err_msg=str(path))
                windows = [(-7, -5, 40, 30), (width - 20, height - 9, 50, 40)]
                windows += [(int(x), int(y), 300, 257) for x, y in rng.integers(0, max(width, height), (4, 2))]
                for x, y, w, h in windows:
                    location = (round(x * ds), round(y * ds)) if ds.is_integer() else (x, y)
                    ours = fast.read_region_array(location, level, (w, h))
                    np.testing.assert_array_equal(ours, ref.read_region_array(location, level, (w, h)))
                    np.testing.assert_array_equal(ours, pil_rgb(raw.read_region(location, level, (w, h))))
                    assert ours.shape == (h, w, 3) and ours.dtype == np.uint8
            raw.close()


def test_outside_the_slide_is_white_with_both_readers(slide_025: Path) -> None:
    for reader in ("openslide", "tifffile"):
        with open_slide(slide_025, reader=reader) as slide:
            width, height = slide.dimensions
            region = slide.read_region_array((width - 100, height - 50), 0, (300, 200))
        assert (region[50:] == 255).all() and (region[:, 100:] == 255).all(), reader
        assert (region[:50, :100] != 255).any(), reader


def test_a_location_between_level_pixels_is_read_by_openslide() -> None:
    """boxes.tiff's level 2 is 4.016x level 0: (100, 100) is no whole level-2 pixel; OpenSlide places it."""
    with Slide(FIXTURES / "boxes.tiff", mpp=0.25) as fast, Slide(FIXTURES / "boxes.tiff", mpp=0.25,
                                                                reader="openslide") as ref:
        assert fast.reader == "tifffile"
        np.testing.assert_array_equal(fast.read_region_array((100, 100), 2, (30, 20)),
                                      ref.read_region_array((100, 100), 2, (30, 20)))


def test_auto_falls_back_to_openslide_and_tifffile_refuses(real_slide: Path) -> None:
    dicom = FIXTURES / "boxes_0.dcm"
    with open_slide(dicom, reader="auto") as slide:
        assert slide.reader == "openslide"
        assert slide.read_region_array((0, 0), 0, (16, 16)).shape == (16, 16, 3)
    with pytest.raises(ReaderUnavailableError, match=r"boxes_0\.dcm.*dicom.*`reader` openslide"):
        open_slide(dicom, reader="tifffile")
    with pytest.raises(ValueError, match="`reader` must be one of auto, openslide, tifffile"):
        open_slide(real_slide, reader="fast")
    for reader in ("auto", "tifffile"):  # OpenSlide refuses it first, with the same message as ever
        with pytest.raises(SlideReadError, match=r"unopenable\.tiff.*not a slide OpenSlide can read"):
            open_slide(FIXTURES / "unopenable.tiff", reader=reader)


@pytest.mark.parametrize("reader", ["openslide", "tifffile"])
def test_a_corrupt_tile_is_one_clear_error(reader: str) -> None:
    with open_slide(FIXTURES / "unreadable.svs", reader=reader) as slide:
        assert slide.reader == reader
        with pytest.raises(SlideReadError, match=r"unreadable\.svs: failed to read region \(0, 0\) at level 0"):
            slide.read_region_array((0, 0), 0, (16, 16))


def test_one_handle_serves_many_threads(slide_025: Path) -> None:
    with open_slide(slide_025) as slide:
        grid = tile_slide(slide).grid
        coords = [tuple(int(v) for v in xy) for xy in grid.coords[:40]]
        alone = [slide.read_region_array(xy, 1, (256, 256)) for xy in coords]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda xy: slide.read_region_array(xy, 1, (256, 256)), coords * 3))
    for index, tile in enumerate(together):
        np.testing.assert_array_equal(tile, alone[index % len(coords)])


def test_features_do_not_depend_on_the_reader(real_slide: Path, slide_025: Path) -> None:
    """Through the tile stream (worker processes; the 0.25-mpp slide is resized, the SVS read as is)."""
    encoder = tiny_gigapath()
    for path in (real_slide, slide_025):
        with open_slide(path) as slide:
            grid = tile_slide(slide).grid
        features = {reader: embed_grid(path, grid, encoder, CPU, batch_size=8, workers=1, reader=reader)
                    for reader in ("openslide", "tifffile")}
        np.testing.assert_array_equal(features["tifffile"], features["openslide"])


def test_cli_reader_choice(
    real_slide: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["info", "--reader", "openslide", str(real_slide)]) == 0
    assert '"reader": "openslide"' in capsys.readouterr().out
    assert main(["info", str(real_slide), str(FIXTURES / "boxes_0.dcm")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert ['"reader": "tifffile"' in out[0], '"reader": "openslide"' in out[1]] == [True, True]
    assert main(["info", "--reader", "tifffile", str(FIXTURES / "boxes_0.dcm")]) == 1
    assert "boxes_0.dcm" in caplog.text and "--reader openslide" in caplog.text


def _read_in_child(slide: Slide, queue: multiprocessing.Queue) -> None:
    queue.put(slide.read_region_array((100, 100), 0, (600, 600)))


def test_a_handle_used_before_a_fork_still_reads_in_the_child(slide_025: Path) -> None:
    """DataLoader workers are forked: a decode pool inherited from the parent has no threads (fastslide hangs
    there); the reader starts its own in the child."""
    with open_slide(slide_025) as slide:
        expected = slide.read_region_array((100, 100), 0, (600, 600))  # 9 tiles: the parent's pool runs
        assert slide._fast is not None and slide._fast._pool is not None
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_read_in_child, args=(slide, queue))
        child.start()
        try:
            np.testing.assert_array_equal(queue.get(timeout=60), expected)
        finally:
            child.join(timeout=10)
            child.kill()

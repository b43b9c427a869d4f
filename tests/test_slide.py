"""Opening slides with real OpenSlide: metadata, mpp resolution and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.synthetic import tissue_image
from vlm.wsi.collect import collect_slides
from vlm.wsi.slide import ImplausibleMppError, MissingMppError, SlideReadError, open_slide
from vlm.wsi.synthetic import write_pyramidal_tiff


def test_real_aperio_slide_metadata(real_slide: Path) -> None:
    with open_slide(real_slide) as slide:
        info = slide.info()
    assert info.dimensions == (2220, 2967)
    assert info.vendor == "aperio"
    assert info.mpp == pytest.approx(0.499)
    assert info.mpp_source == "openslide"
    assert info.objective_power == 20.0


def test_generic_tiff_pyramid_levels_and_mpp(slide_025: Path) -> None:
    with open_slide(slide_025) as slide:
        info = slide.info()
        assert slide.best_level_for_downsample(2.0) == 1
        assert slide.best_level_for_downsample(1.9) == 0  # never a level coarser than asked
    assert info.level_dimensions == ((4096, 3072), (2048, 1536), (1024, 768))
    assert info.mpp == pytest.approx(0.25)


def test_missing_mpp_is_an_error_unless_given(tmp_path: Path) -> None:
    path = tmp_path / "no_mpp.tiff"
    write_pyramidal_tiff(path, (512, 512), tissue_image(512, 512, (0, 0, 256, 256)), mpp=None, n_levels=1)
    with pytest.raises(MissingMppError, match=r"no_mpp\.tiff.*`mpp`"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.info().mpp_source == "user"


def test_text_file_named_svs_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "report.svs"
    path.write_text("this is a pathology report, not a slide\n")
    with pytest.raises(SlideReadError, match=r"report\.svs.*not a slide"):
        open_slide(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SlideReadError, match="no such slide"):
        open_slide(tmp_path / "absent.svs")


def test_collect_slides_from_files_folders_and_lists(tmp_path: Path, real_slide: Path, slide_05: Path) -> None:
    nested = tmp_path / "cohort" / "batch1"
    nested.mkdir(parents=True)
    (nested / "a.svs").write_bytes(b"x")
    (nested / "notes.md").write_text("not a slide")
    listing = tmp_path / "slides.txt"
    listing.write_text(f"# my cohort\n{real_slide}\n\ncohort/batch1/a.svs\n")
    found = collect_slides([slide_05, tmp_path / "cohort", listing])
    assert found == [slide_05, nested / "a.svs", real_slide]


def test_collect_slides_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no slide files"):
        collect_slides([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="no such slide"):
        collect_slides([tmp_path / "nope.svs"])


OPENSLIDE_FIXTURES = Path(__file__).parent / "fixtures" / "openslide-python"


def test_a_dicom_series_of_several_files_is_one_slide(tmp_path: Path) -> None:
    """openslide-python's boxes_0.dcm + boxes_1.dcm are one series: one slide, whichever way it is named."""
    folder = tmp_path / "dicom"
    folder.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        (folder / name).write_bytes((OPENSLIDE_FIXTURES / name).read_bytes())
    (folder / "other.svs").write_bytes((OPENSLIDE_FIXTURES / "boxes.tiff").read_bytes())
    assert collect_slides([folder]) == [folder / "boxes_0.dcm", folder / "other.svs"]
    assert collect_slides([folder / "boxes_1.dcm", folder / "boxes_0.dcm"]) == [folder / "boxes_0.dcm"]
    with open_slide(folder / "boxes_0.dcm") as slide:
        assert slide.info().mpp == pytest.approx(0.499)


def test_an_implausible_recorded_scale_is_refused_unless_given() -> None:
    """boxes.tiff records 352.8 µm/px (a placeholder): refused, not tiled into one-pixel tiles."""
    with pytest.raises(ImplausibleMppError, match=r"boxes\.tiff: level-0 scale 352\.778 µm/px .*`mpp`"):
        open_slide(OPENSLIDE_FIXTURES / "boxes.tiff")
    with open_slide(OPENSLIDE_FIXTURES / "boxes.tiff", mpp=0.25) as slide:
        assert slide.info().mpp_source == "user"


def test_tiling_never_upsamples() -> None:
    from vlm.wsi.tiling import TilingParams, tile_size_level0, tile_slide

    with open_slide(OPENSLIDE_FIXTURES / "boxes.tiff", mpp=352.78) as slide:
        with pytest.raises(ValueError, match=r"boxes\.tiff: .*0\.363 level-0 px and would be upsampled"):
            tile_slide(slide)
    with open_slide(OPENSLIDE_FIXTURES / "boxes.tiff", mpp=1.0) as slide:
        with pytest.raises(ValueError, match="would be upsampled"):
            tile_slide(slide)
    # At its own scale, or a coarser one, it is read without upsampling; a 20× scan at 0.504 µm/px still tiles.
    assert tile_size_level0(1.0, TilingParams(target_mpp=1.0)) == 256
    assert tile_size_level0(1.0, TilingParams(target_mpp=2.0)) == 512
    assert tile_size_level0(0.504, TilingParams()) == 254


def test_info_reports_each_slide_and_exits_1_when_one_fails(real_slide: Path, capsys: pytest.CaptureFixture) -> None:
    from vlm.cli import main

    assert main(["info", str(OPENSLIDE_FIXTURES / "boxes.tiff"), str(real_slide)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and '"mpp": 0.499' in printed[0]

"""Feature files: round trip with provenance, TRIDENT/CLAM files, refusal of inconsistent files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.support.peers import (
    clam_contour_grid,
    trident_grid,
    write_clam_features,
    write_clam_patches,
    write_trident_features,
)
from vlm import __version__
from vlm.formats.features import (
    FeatureFileError,
    TileFeatures,
    TileGrid,
    feature_files,
    read_features,
    read_tile_grid,
    write_features,
    write_tile_grid,
)


def make_grid(n: int = 5) -> TileGrid:
    coords = np.stack([np.arange(n) * 512, np.full(n, 1024)], axis=1)
    return TileGrid(coords=coords, mpp=0.25, tile_size=256, target_mpp=0.5, tile_size_level0=512, slide_path="s.svs")


def test_feature_file_round_trip_with_provenance(tmp_path: Path) -> None:
    grid = make_grid()
    features = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    write_features(tmp_path / "s.h5", TileFeatures(grid, features, encoder="gigapath"))
    loaded = read_features(tmp_path / "s.h5")
    np.testing.assert_array_equal(loaded.features, features)
    np.testing.assert_array_equal(loaded.coords, grid.coords)
    assert loaded.coords.dtype == np.int64
    assert (loaded.mpp, loaded.grid.tile_size, loaded.grid.tile_size_level0, loaded.grid.target_mpp) == (
        0.25, 256, 512, 0.5)
    assert loaded.encoder == "gigapath"
    with h5py.File(tmp_path / "s.h5") as h5:
        assert h5.attrs["vlm_version"] == __version__


def test_float16_features_and_no_leftover_temp_files(tmp_path: Path) -> None:
    write_features(tmp_path / "s.h5", TileFeatures(make_grid(), np.ones((5, 4))), dtype="float16")
    with h5py.File(tmp_path / "s.h5") as h5:
        assert h5["features"].dtype == np.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_tile_grid_file_has_no_features(tmp_path: Path) -> None:
    write_tile_grid(tmp_path / "g.h5", make_grid())
    assert len(read_tile_grid(tmp_path / "g.h5")) == 5
    with pytest.raises(FeatureFileError, match="no 'features' dataset.*embed-tiles"):
        read_features(tmp_path / "g.h5")


def test_trident_file_without_mpp_uses_its_magnification(tmp_path: Path) -> None:
    """TRIDENT writes no mpp: level-0 µm/px is 10 / level0_magnification, and the provenance says so."""
    coords = trident_grid(4, 12, level0_magnification=40)
    features = np.random.default_rng(1).normal(size=(len(coords), 6)).astype(np.float32)
    write_trident_features(tmp_path / "t40.h5", coords, features, level0_magnification=40)
    loaded = read_features(tmp_path / "t40.h5")
    assert (loaded.mpp, loaded.grid.tile_size, loaded.grid.tile_size_level0) == (0.25, 256, 512)
    assert loaded.grid.target_mpp == pytest.approx(0.5)
    assert "level0_magnification 40" in loaded.grid.mpp_source and "TRIDENT" in loaded.grid.mpp_source
    assert loaded.encoder == "conch_v15"  # kept on `features` by TRIDENT
    np.testing.assert_array_equal(loaded.features, features)
    # A --mpp within 25 % of the magnification's value is taken (a 0.2263-µm/px 40× scan) ...
    assert read_features(tmp_path / "t40.h5", mpp=0.2263).mpp == 0.2263
    # ... one that contradicts it is refused, naming the file and both values.
    with pytest.raises(FeatureFileError, match=r"t40\.h5: `mpp` 0\.5 contradicts .*level0_magnification 40"):
        read_features(tmp_path / "t40.h5", mpp=0.5)


def test_clam_feature_file_is_read_with_its_patches_file(tmp_path: Path) -> None:
    """CLAM: geometry from patches/<slide>.h5 (two contours, each grid at its bounding box), scale from --mpp."""
    (tmp_path / "patches").mkdir()
    (tmp_path / "h5_files").mkdir()
    contours = [clam_contour_grid((1000, 3000), (2048, 1024), 256, downsample=2),
                clam_contour_grid((9001, 3007), (1536, 2048), 256, downsample=2)]
    coords = write_clam_patches(tmp_path / "patches" / "s1.h5", contours, patch_size=256, patch_level=1,
                                downsample=2.0)
    features = np.random.default_rng(2).normal(size=(len(coords), 6)).astype(np.float32)
    write_clam_features(tmp_path / "h5_files" / "s1.h5", coords, features)
    path = tmp_path / "h5_files" / "s1.h5"
    with pytest.raises(FeatureFileError, match=r"s1\.h5: no tile size attribute.*`patches`"):
        read_features(path, mpp=0.25)
    with pytest.raises(FeatureFileError, match=r"s1\.h5: no level-0 'mpp'.*`mpp`"):
        read_features(path, patches=tmp_path / "patches")
    loaded = read_features(path, mpp=0.25, patches=tmp_path / "patches")
    assert (loaded.grid.tile_size, loaded.grid.tile_size_level0, loaded.mpp) == (256, 512, 0.25)
    assert loaded.grid.target_mpp == pytest.approx(0.5) and loaded.grid.mpp_source == "--mpp"
    np.testing.assert_array_equal(loaded.coords, coords)
    np.testing.assert_array_equal(loaded.features, features)
    # Features from another patching run (other coords) are refused, naming both files.
    write_clam_patches(tmp_path / "patches" / "s1.h5", contours[:1], patch_size=256, downsample=2.0)
    with pytest.raises(FeatureFileError, match=r"s1\.h5: its coords do not match .*patches"):
        read_features(path, mpp=0.25, patches=tmp_path / "patches")
    with pytest.raises(FeatureFileError, match="no CLAM patch file"):
        read_features(path, mpp=0.25, patches=tmp_path / "h5_files" / "absent")


def _vlm_file(path: Path, **attrs: object) -> Path:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("coords", data=np.array([[0, 0], [512, 0]], np.int64))
        h5.create_dataset("features", data=np.zeros((2, 4), np.float32))
        h5.attrs.update({"mpp": 0.25, "tile_size": 256, "tile_size_level0": 512, "target_mpp": 0.5, **attrs})
    return path


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"mpp": "0.25"}, r"s\.h5: attribute 'mpp' is '0\.25' \(str\)"),
        ({"tile_size_level0": 0}, r"s\.h5: attribute 'tile_size_level0' is 0"),
        ({"tile_size_level0": -512}, r"s\.h5: attribute 'tile_size_level0' is -512"),
        ({"mpp": float("nan")}, r"s\.h5: attribute 'mpp' is nan"),
        ({"mpp": 352.8}, r"s\.h5: level-0 scale 352\.8 µm/px .*plausible range.*`mpp`"),
    ],
)
def test_bad_geometry_attributes_name_the_file_and_attribute(tmp_path: Path, attrs: dict, message: str) -> None:
    with pytest.raises(FeatureFileError, match=message):
        read_features(_vlm_file(tmp_path / "s.h5", **attrs))


def test_an_implausible_recorded_scale_is_taken_when_given_explicitly(tmp_path: Path) -> None:
    path = _vlm_file(tmp_path / "s.h5", mpp=352.8)
    assert read_features(path, mpp=0.25).mpp == 0.25


def test_inconsistent_or_unreadable_files_refused(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "bad.h5", "w") as h5:
        h5.create_dataset("coords", data=np.zeros((4, 2), np.int64))
        h5.create_dataset("features", data=np.zeros((3, 8), np.float32))
        h5.attrs.update(mpp=0.5, tile_size=256, tile_size_level0=256, target_mpp=0.5)
    with pytest.raises(FeatureFileError, match=r"bad\.h5.*\(3, 8\).*4 rows"):
        read_features(tmp_path / "bad.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(FeatureFileError, match=r"text\.h5.*not a readable HDF5"):
        read_features(tmp_path / "text.h5")
    with pytest.raises(FeatureFileError, match="no such feature file"):
        read_features(tmp_path / "absent.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .h5 feature files"):
        feature_files(tmp_path / "empty")


def test_a_flipped_byte_in_written_features_is_refused(tmp_path: Path) -> None:
    """One flipped bit in the `features` data read back as a slightly different, finite number, silently."""
    grid = make_grid(6)
    features = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    path = tmp_path / "s.h5"
    write_features(path, TileFeatures(grid=grid, features=features, encoder="tiny"))
    data = bytearray(path.read_bytes())
    offset = data.find(features.tobytes()[:256])
    assert offset > 0
    data[offset + 128] ^= 0x01  # a low mantissa bit: finite, wrong, invisible to a NaN check
    path.write_bytes(bytes(data))
    with pytest.raises(FeatureFileError, match=r"s\.h5: 'features' is not readable .*re-run `vlm embed-tiles`"):
        read_features(path)

"""Feature files: round trip with provenance, TRIDENT/CLAM files, refusal of inconsistent files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from vlm import __version__
from vlm.features import (
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


def write_trident_style(path: Path, features: np.ndarray, with_mpp: bool) -> None:
    """As TRIDENT/CLAM write them: patch sizes as attributes of `coords`, features maybe [1, N, D]."""
    with h5py.File(path, "w") as h5:
        coords = h5.create_dataset("coords", data=np.array([[0, 0], [448, 0], [0, 448]], dtype=np.int32))
        coords.attrs["patch_size"] = 224
        coords.attrs["patch_size_level0"] = 448
        if with_mpp:
            coords.attrs["mpp"] = 0.25
        h5.create_dataset("features", data=features)


def test_trident_and_clam_files_read(tmp_path: Path) -> None:
    features = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    write_trident_style(tmp_path / "trident.h5", features, with_mpp=True)
    loaded = read_features(tmp_path / "trident.h5")
    assert (loaded.mpp, loaded.grid.tile_size, loaded.grid.tile_size_level0) == (0.25, 224, 448)
    assert loaded.grid.target_mpp == pytest.approx(0.5)
    write_trident_style(tmp_path / "clam.h5", features[None], with_mpp=False)
    with pytest.raises(FeatureFileError, match=r"clam\.h5.*--mpp"):
        read_features(tmp_path / "clam.h5")
    np.testing.assert_array_equal(read_features(tmp_path / "clam.h5", mpp=0.5).features, features)


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

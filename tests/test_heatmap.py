"""Text -> tile heatmaps: exact decomposition of the slide score, encoder provenance, the three output files,
and (on the demo's outputs) agreement with slide scores and a stitched-slide semantic check."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.support.frozen import build_frozen_run
from vlm.cli import main
from vlm.encoders.slide import create_slide_encoder
from vlm.formats.embeddings import read_slide_embeddings
from vlm.formats.features import TileFeatures, TileGrid, read_features, write_features
from vlm.heatmap import slide_tower, tile_scores
from vlm.model.clip import SlideTextModel, build_tiny_model
from vlm.model.projection import ProjectionHead

QUERIES = ["papillary fronds", "solid sheets of squamous cells"]


@pytest.mark.parametrize("projection", ["linear", "mlp"])
def test_tile_scores_average_to_the_slide_score(tmp_path: Path, projection: str) -> None:
    """The mean of the tile scores is the slide's cosine score from the full slide tower, for both heads."""
    model = build_tiny_model(tmp_path, slide_encoder="tiny")
    if projection == "mlp":
        model.slide_proj = ProjectionHead(64, 32, "mlp")
    model.eval()
    features = np.random.default_rng(0).normal(size=(40, 32)).astype(np.float32)
    coords = np.random.default_rng(1).uniform(0, 8000, size=(40, 2))
    texts = model.encode_text(QUERIES)
    scores, slide = tile_scores(model, slide_tower(model), features, coords, texts)
    with torch.no_grad():
        expected = (model.encode_slides(torch.from_numpy(features)[None], torch.from_numpy(coords)[None]) @ texts.T)[0]
    assert scores.shape == (40, 2)
    np.testing.assert_allclose(scores.mean(0), expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(slide, expected.numpy(), atol=1e-5)
    assert scores.std(0).min() > 1e-3  # tiles differ: not the slide score copied to every tile


@pytest.fixture
def frozen_run(tmp_path: Path, slide_05: Path) -> dict:
    return build_frozen_run(tmp_path, [slide_05])


def test_heatmap_cli_writes_png_qupath_geojson_and_csv(frozen_run: dict[str, Path]) -> None:
    """GeoJSON as QuPath reads it (qupath/qupath, qupath-core/src/main/java/qupath/lib/io/
    PathObjectTypeAdapters.java, `PathObjectTypeAdapter.read`): `properties.objectType` "tile" makes a tile
    object, `properties.measurements` may be a name -> number object (v0.4+), `id` is parsed as a UUID."""
    import uuid

    run = frozen_run
    code = main(
        [
            "heatmap",
            "--model",
            str(run["model"]),
            "--features",
            str(run["features"]),
            "--slide",
            str(run["slide"]),
            "--query",
            QUERIES[0],
            "--query",
            QUERIES[1],
            "--out",
            str(run["out"]),
        ]
    )
    assert code == 0
    slide_id = run["features"].stem
    # the model carries the encoder's provenance from the parquet
    source = json.loads((run["model"] / "config.json").read_text())["slide_source"]
    assert source["encoder"] == "tiny" and source["checkpoint"] == str(run["checkpoint"])
    assert len(source["weights_sha256"]) == 64 and len(source["checkpoint_sha256"]) == 64

    from PIL import Image

    with Image.open(run["out"] / f"{slide_id}.png") as image:
        assert image.width > 400 and image.height > 200
    geojson = json.loads((run["out"] / f"{slide_id}.geojson").read_text())
    grid = read_features(run["features"]).grid
    assert geojson["type"] == "FeatureCollection" and len(geojson["features"]) == len(grid)
    first = geojson["features"][0]
    assert first["geometry"]["type"] == "Polygon"
    ring = first["geometry"]["coordinates"][0]
    x, y = grid.coords[0]
    assert ring[0] == ring[-1] == [x, y] and [x + 256, y + 256] in ring  # level-0 px, closed ring
    assert first["properties"]["objectType"] == "tile"
    uuid.UUID(first["id"])
    assert set(first["properties"]["measurements"]) == {f"score: {q}" for q in QUERIES}

    table = pd.read_csv(run["out"] / f"{slide_id}.csv")
    assert list(table.columns) == ["x", "y", "size", *[f"score: {q}" for q in QUERIES]]
    np.testing.assert_array_equal(table[["x", "y"]].to_numpy(), grid.coords)
    # pooled tile scores = the slide score from the cached embedding, through the model's projection
    model = SlideTextModel.from_pretrained(run["model"])
    embedding = torch.from_numpy(np.stack(read_slide_embeddings(run["parquet"])["embedding"]))
    expected = (model.encode_slide_embeddings(embedding) @ model.encode_text(QUERIES).T)[0].detach().numpy()
    np.testing.assert_allclose(table[[f"score: {q}" for q in QUERIES]].mean().to_numpy(), expected, atol=1e-4)


def test_one_query_is_measured_as_score(frozen_run: dict[str, Path]) -> None:
    run = frozen_run
    assert (
        main(
            [
                "heatmap",
                "--model",
                str(run["model"]),
                "--features",
                str(run["features"]),
                "--query",
                QUERIES[0],
                "--out",
                str(run["out"]),
            ]
        )
        == 0
    )  # slide from the .h5's slide_path
    geojson = json.loads((run["out"] / f"{run['features'].stem}.geojson").read_text())
    assert list(geojson["features"][0]["properties"]["measurements"]) == ["score"]


def test_other_slide_encoder_weights_are_refused(frozen_run: dict[str, Path], tmp_path: Path, caplog) -> None:
    run = frozen_run
    torch.manual_seed(123)
    other = tmp_path / "other.pt"
    torch.save(create_slide_encoder("tiny").state_dict(), other)
    code = main(
        [
            "heatmap",
            "--model",
            str(run["model"]),
            "--features",
            str(run["features"]),
            "--slide-checkpoint",
            str(other),
            "--query",
            QUERIES[0],
            "--out",
            str(run["out"]),
        ]
    )
    assert code == 2
    assert "not the slide encoder that made this model's" in caplog.text
    assert not run["out"].exists() or not list(run["out"].glob("*.png"))


def test_model_without_provenance_is_refused(tmp_path: Path, frozen_run: dict[str, Path], caplog) -> None:
    run = frozen_run
    model_dir = build_tiny_model(tmp_path / "old").save_pretrained(tmp_path / "old_model")
    code = main(
        [
            "heatmap",
            "--model",
            str(model_dir),
            "--features",
            str(run["features"]),
            "--query",
            QUERIES[0],
            "--out",
            str(run["out"]),
        ]
    )
    assert code == 2 and "does not record which slide encoder" in caplog.text


def test_a_broken_feature_file_fails_that_slide_only(frozen_run: dict[str, Path], tmp_path: Path) -> None:
    run = frozen_run
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not hdf5")
    code = main(
        [
            "heatmap",
            "--model",
            str(run["model"]),
            "--features",
            str(run["features"]),
            str(broken),
            "--query",
            QUERIES[0],
            "--out",
            str(run["out"]),
        ]
    )
    assert code == 1
    assert (run["out"] / f"{run['features'].stem}.png").is_file() and not (run["out"] / "broken.png").exists()
    assert "broken" in (run["out"] / "failures.csv").read_text()


# --- on the demo's outputs ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_pooled_tile_scores_rank_demo_slides_as_slide_scores_do(demo_out: Path) -> None:
    """Across the demo's slides, the mean tile score (from the features through the rebuilt slide encoder)
    ranks slides as the slide scores from the cached embeddings do, for the demo's search phrase."""
    from scipy.stats import spearmanr

    from vlm.demo.run import SEARCH_QUERY

    model = SlideTextModel.from_pretrained(demo_out / "align" / "model")
    encoder = slide_tower(model)
    frame = read_slide_embeddings(demo_out / "slides.parquet")
    text = model.encode_text([SEARCH_QUERY])
    slide_scores = (model.encode_slide_embeddings(torch.from_numpy(np.stack(frame["embedding"]))) @ text.T)[:, 0]
    from vlm.encoders.inputs import load_slide_inputs

    pooled = []
    for slide_id in frame["slide_id"]:
        slide = load_slide_inputs(demo_out / "features" / f"{slide_id}.h5", encoder.config.in_dim)
        pooled.append(tile_scores(model, encoder, slide.features, slide.coords, text)[0][:, 0].mean())
    rho = spearmanr(pooled, slide_scores.detach().numpy()).statistic
    assert rho >= 0.9, rho
    np.testing.assert_allclose(pooled, slide_scores.detach().numpy(), atol=1e-3)


def _stitch(demo_out: Path, left: str, right: str, out: Path) -> tuple[Path, Path, int]:
    """A slide whose left half is `left` and right half is `right` (image and tile features side by side)."""
    from vlm.wsi.slide import open_slide
    from vlm.wsi.synthetic import write_pyramidal_tiff

    images, parts = [], []
    for slide_id in (left, right):
        with open_slide(next((demo_out / "slides").glob(f"{slide_id}.*"))) as slide:
            images.append(slide.read_level_rgb(0))
        parts.append(read_features(demo_out / "features" / f"{slide_id}.h5"))
    width = images[0].shape[1]
    image = np.concatenate(images, axis=1)
    slide_path = out / f"{left}+{right}.tiff"
    write_pyramidal_tiff(slide_path, (image.shape[1], image.shape[0]), image, mpp=0.5)
    grid = parts[0].grid
    coords = np.concatenate([parts[0].coords, parts[1].coords + [width, 0]])
    stitched = TileFeatures(
        TileGrid(coords, grid.mpp, grid.tile_size, grid.target_mpp, grid.tile_size_level0, str(slide_path)),
        np.concatenate([parts[0].features, parts[1].features]),
    )
    feature_path = out / f"{left}+{right}.h5"
    write_features(feature_path, stitched)
    return slide_path, feature_path, width


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="measured 2026-11-27 on the demo (random tiny slide encoder, random ResNet tile features): for "
    "some class pairs the tile heat follows tile position, not class (12/24 pairs with single phrases, "
    "17/24 with prompt-ensemble contrast); strict, so it fails loudly once the demo's heat becomes semantic",
)
def test_stitched_slide_each_class_phrase_is_hotter_on_its_own_half(demo_out: Path, tmp_path: Path) -> None:
    """Two held-out demo slides of different classes side by side: with the prompt task's phrases (wording
    no training report uses), each class's phrase scores higher on its own half than on the other."""
    import yaml

    task = yaml.safe_load((Path(__file__).parents[1] / "prompts" / "demo_morphology.yaml").read_text())
    phrases = {name: synonyms[0] for name, synonyms in task["classes"].items()}
    labels = pd.read_csv(demo_out / "test_labels.csv")
    first = labels.groupby("label")["slide_id"].first()
    failures = []
    for a, b in itertools.permutations(sorted(phrases), 2):
        slide_path, feature_path, width = _stitch(demo_out, first[a], first[b], tmp_path)
        out = tmp_path / "heat"
        assert main(["heatmap", "--model", str(demo_out / "align" / "model"), "--features", str(feature_path),
                     "--slide", str(slide_path), "--query", phrases[a], "--query", phrases[b],
                     "--out", str(out)]) == 0  # fmt: skip
        table = pd.read_csv(out / f"{feature_path.stem}.csv")
        left = table["x"] < width
        for name, own_left in ((a, True), (b, False)):
            column = table[f"score: {phrases[name]}"]
            own, other = (column[left], column[~left]) if own_left else (column[~left], column[left])
            if not own.mean() > other.mean():
                failures.append(f"{a}|{b}: {phrases[name]!r} {own.mean():.3f} on its half vs {other.mean():.3f}")
    assert not failures, failures


def test_zeroshot_heatmaps_use_each_slides_predicted_class(frozen_run: dict, tmp_path: Path) -> None:
    run = frozen_run
    out = tmp_path / "zs"
    code = main(["zeroshot", "--model", str(run["model"]), "--slides", str(run["parquet"]), "--classes",
                 "papillary=papillary carcinoma", "solid=solid carcinoma", "--out", str(out), "--no-cache",
                 "--heatmaps", str(out / "heat"), "--heatmap-features", str(run["features"].parent)])  # fmt: skip
    assert code == 0
    predicted = pd.read_csv(out / "predictions.csv").set_index("slide_id")["predicted"]
    slide_id = run["features"].stem
    geojson = json.loads((out / "heat" / f"{slide_id}.geojson").read_text())
    assert geojson["properties"]["queries"][0].startswith(f"{predicted[slide_id]} (predicted")
    # the heat of the predicted class averages to that class's cosine score, which zero-shot turned into p
    from vlm.zeroshot import ZeroShotClassifier

    model = SlideTextModel.from_pretrained(run["model"])
    classifier = ZeroShotClassifier.from_classes(
        model, {"papillary": ["papillary carcinoma"], "solid": ["solid carcinoma"]}, use_cache=False
    )
    embedding = torch.from_numpy(np.stack(read_slide_embeddings(run["parquet"])["embedding"]))
    cosine = (model.encode_slide_embeddings(embedding) @ classifier.prototypes.T)[0]
    row = list(classifier.classes).index(predicted[slide_id])
    table = pd.read_csv(out / "heat" / f"{slide_id}.csv")
    assert table["score"].mean() == pytest.approx(float(cosine[row].detach()), abs=1e-4)


@pytest.mark.slow
def test_demo_writes_heatmaps_of_held_out_slides(demo_out: Path) -> None:
    labels = pd.read_csv(demo_out / "test_labels.csv").set_index("slide_id")["label"]
    pngs = sorted((demo_out / "heatmaps").glob("*.png"))
    assert len(pngs) == labels.nunique() and {labels[p.stem] for p in pngs} == set(labels)  # one per class
    for png in pngs:
        for suffix in (".geojson", ".csv"):
            assert png.with_suffix(suffix).is_file()
    assert f"](heatmaps/{pngs[0].stem}.png)" in (demo_out / "summary.md").read_text()


def test_an_empty_query_is_a_usage_error(frozen_run: dict, caplog: pytest.LogCaptureFixture) -> None:
    run = frozen_run
    code = main(["heatmap", "--model", str(run["model"]), "--features", str(run["features"]), "--query", " ",
                 "--out", str(run["out"])])  # fmt: skip
    assert code == 2 and "non-empty query" in caplog.text and not run["out"].exists()

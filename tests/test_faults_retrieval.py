"""Fault campaign, retrieval and outputs: damaged, hostile and concurrent inputs give a right answer or one error.

Each test names the silent wrong answer (or loss) it guards against.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vlm.cli import main

ROOT = Path(__file__).resolve().parents[1]

# --- retrieval ---------------------------------------------------------------------------------------


def _slides(path: Path, slide_ids: list[str], seed: int = 0) -> Path:
    """A `vlm embed-slides`-shaped parquet of random 64-d embeddings."""
    rng = np.random.default_rng(seed)
    pd.DataFrame({"slide_id": slide_ids, "embedding": [rng.normal(size=64).tolist() for _ in slide_ids],
                  "n_tiles": 10, "encoder": "tiny", "pool": "mean"}).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.support.models import build_tiny_model

    root = tmp_path_factory.mktemp("faults-retrieval")
    build_tiny_model(root / "tok", slide_embed_dim=64, proj_dim=32).save_pretrained(root / "model")
    slides = _slides(root / "slides.parquet", [f"S-{i:02d}" for i in range(20)])
    index = root / "index"
    argv = ["index", "build", "--model", str(root / "model"), "--embeddings", str(slides), "--out", str(index)]
    assert main(argv) == 0
    return {"root": root, "model": root / "model", "slides": slides, "index": index}


def _build(world: dict[str, Path], out: Path | str, *extra: str) -> int:
    return main(["index", "build", "--model", str(world["model"]), "--embeddings", str(world["slides"]), "--out",
                 str(out), *extra])


def _copy_index(world: dict[str, Path], tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(world["index"], tmp_path / "index"))


def test_index_build_never_replaces_a_folder_that_is_not_an_index(
    world: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Today `--out DIR` deleted DIR, input parquet included."""
    data = tmp_path / "data"
    data.mkdir()
    parquet = _slides(data / "slides.parquet", ["A", "B"])
    before = parquet.read_bytes()
    for extra in ((), ("--overwrite",)):
        caplog.clear()
        assert _build(world, data, *extra) == 2
        assert "is not a vlm index" in caplog.text and "slides.parquet" in caplog.text
        assert parquet.read_bytes() == before and sorted(p.name for p in data.iterdir()) == ["slides.parquet"]


def test_index_build_replaces_an_index_only_with_overwrite(
    world: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = _copy_index(world, tmp_path)
    manifest = (index / "manifest.json").read_text()
    assert _build(world, index) == 2 and "--overwrite" in caplog.text
    assert (index / "manifest.json").read_text() == manifest
    assert _build(world, index, "--overwrite", "--kind", "hnsw") == 0
    assert json.loads((index / "manifest.json").read_text())["kind"] == "hnsw"


def test_index_build_into_the_current_folder(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out .` crashed (a folder name of "")."""
    from vlm.retrieval import SlideIndex

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert _build(world, ".") == 0
    assert Path.cwd() == here and len(SlideIndex.load(".")) == 20
    assert _build(world, ".", "--overwrite") == 0


@pytest.mark.parametrize("damage", ["flip-vector", "flip-id", "truncate", "flip-metadata-id"])
def test_a_damaged_index_is_refused_naming_the_file(
    world: dict[str, Path],
    tmp_path: Path,
    damage: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Flipped vector bytes gave a slide a score of 40 (true score -0.16); a flipped id made a slide vanish;
    a truncated file gave a FAISS traceback."""
    import faiss

    index = _copy_index(world, tmp_path)
    data = (index / "index.faiss").read_bytes()
    loaded = faiss.read_index(str(index / "index.faiss"))
    ids = faiss.vector_to_array(loaded.id_map)
    if damage == "flip-vector":  # the first vector's first float becomes huge
        start = data.index(np.asarray(loaded.index.reconstruct(0), dtype="<f4").tobytes())
        data = data[:start] + np.float32(40.0).tobytes() + data[start + 4 :]
        name = "index.faiss"
    elif damage == "flip-id":  # the last stored id, 19 -> 1019
        start = data.rindex(ids.astype("<i8").tobytes())
        data = data[: start + 8 * 19] + np.int64(1019).tobytes() + data[start + 8 * 20 :]
        name = "index.faiss"
    elif damage == "truncate":
        data = data[: len(data) // 2]
        name = "index.faiss"
    if damage == "flip-metadata-id":
        table = pd.read_parquet(index / "metadata.parquet")
        table.loc[3, "faiss_id"] = 1003
        table.to_parquet(index / "metadata.parquet", index=False)
        name = "metadata.parquet"
    else:
        (index / "index.faiss").write_bytes(data)
    capsys.readouterr()
    assert main(["search", "--index", str(index), "--slide-id", "S-01"]) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"{index / name}: damaged" in errors[0].getMessage()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("damage", ["flip-id", "truncate", "extra-vector"])
def test_an_index_without_checksums_is_still_checked(world: dict[str, Path], tmp_path: Path, damage: str) -> None:
    """Indexes written before checksums: structural checks catch a lost slide, a stale vector in a flat
    index (flat deletes, so it has no tombstones), and FAISS's own error on a truncated file, as one line."""
    import faiss

    from vlm.retrieval import SlideIndex

    index = _copy_index(world, tmp_path)
    manifest = json.loads((index / "manifest.json").read_text())
    del manifest["files"]
    manifest["format_version"] = 1
    (index / "manifest.json").write_text(json.dumps(manifest))
    if damage == "truncate":
        data = (index / "index.faiss").read_bytes()
        (index / "index.faiss").write_bytes(data[: len(data) // 2])
        match = r"index\.faiss: not a readable FAISS index \("
    else:
        stored = faiss.read_index(str(index / "index.faiss"))
        if damage == "flip-id":
            stored.remove_ids(np.array([5], dtype=np.int64))
            stored.add_with_ids(stored.index.reconstruct(0)[None], np.array([1005], dtype=np.int64))
            match = "have no vector"
        else:
            stored.add_with_ids(np.ones((1, 32), dtype=np.float32), np.array([77], dtype=np.int64))
            match = "flat index holds vectors of no item"
        faiss.write_index(stored, str(index / "index.faiss"))
    with pytest.raises(ValueError, match=match) as error:
        SlideIndex.load(index)
    assert "\n" not in str(error.value)


def test_an_empty_query_is_refused(world: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """An empty text was encoded and returned ranked slides as if it meant something."""
    for text in ("", "   "):
        caplog.clear()
        assert main(["search", "--index", str(world["index"]), text]) == 2
        assert "empty query" in caplog.text


def _vlm(*argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlm", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


@pytest.mark.slow
def test_two_concurrent_index_adds_keep_both(world: dict[str, Path], tmp_path: Path) -> None:
    """Two `vlm index add` at once both said they succeeded, and one's slides were lost."""
    from vlm.io import folder_lock
    from vlm.retrieval import SlideIndex

    index = _copy_index(world, tmp_path)
    batches = [_slides(tmp_path / f"new{n}.parquet", [f"N{n}-{i}" for i in range(3)], seed=n) for n in (1, 2)]
    with folder_lock(index):  # both start while the index is busy, so that they really run at the same time
        runs = [_vlm("index", "add", "--index", str(index), "--embeddings", str(batch)) for batch in batches]
        for run in runs:  # each reports that it waits
            assert run.stderr is not None
            assert "waiting for another vlm process" in _read_until(run.stderr, "waiting")
    results = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    assert sorted(SlideIndex.load(index).keys) == sorted(
        [f"S-{i:02d}" for i in range(20)] + [f"N{n}-{i}" for n in (1, 2) for i in range(3)]
    )


def _read_until(stream: object, word: str) -> str:
    seen = ""
    for line in stream:  # type: ignore[attr-defined]
        seen += line
        if word in line:
            return seen
    return seen


def test_two_concurrent_embed_slides_into_one_file(tmp_path: Path) -> None:
    """Two `vlm embed-slides` writing one --out each rewrote the file with its own rows only."""
    from vlm.encoders.slide import create_slide_encoder
    from vlm.formats.features import TileFeatures, TileGrid, write_features
    from vlm.io import output_lock
    from vlm.slide_embeddings import embed_slides

    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(-1, 2) * 512
    grid = TileGrid(coords=coords, mpp=0.25, tile_size=256, target_mpp=0.5, tile_size_level0=512)
    path = tmp_path / "s.h5"
    write_features(path, TileFeatures(grid=grid, features=rng.standard_normal((16, 32)).astype("f4"), encoder="t"))
    out = tmp_path / "slides.parquet"
    holder = _vlm_python(f"from vlm.io import output_lock\nwith output_lock({str(out)!r}):\n"
                         "    print('held', flush=True)\n    import time; time.sleep(60)")
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(BlockingIOError, match="being written by another vlm process"):
            embed_slides([path], out, create_slide_encoder("tiny"), progress=False)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out):  # a live run in this process: the same refusal from the CLI's exit code
        pass
    report = embed_slides([path], out, create_slide_encoder("tiny"), progress=False)
    assert report.done == ["s"]


def _vlm_python(code: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def test_non_finite_slide_embeddings_are_refused_by_id(
    world: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A NaN row was indexed (and scored like any other slide)."""
    from vlm.formats.embeddings import load_slide_embeddings

    path = _slides(tmp_path / "s.parquet", ["A", "B", "C", "D"])
    table = pd.read_parquet(path)
    table.at[1, "embedding"] = [float("nan")] * 64
    table.at[3, "embedding"] = [float("inf")] + [0.0] * 63
    table.to_parquet(path)
    slides = load_slide_embeddings(path)
    slides.check_finite(["C", "A"])  # unused broken rows do not block the others
    with pytest.raises(ValueError, match=r"s\.parquet: 2 slide\(s\) have NaN or infinite .*\['B', 'D'\]"):
        slides.check_finite(["A", "B", "D"])
    assert main(["index", "build", "--model", str(world["model"]), "--embeddings", str(path), "--out",
                 str(tmp_path / "index")]) == 2
    assert "['B', 'D']" in caplog.text and not (tmp_path / "index").exists()


def test_a_flipped_byte_in_slide_embeddings_is_refused(tmp_path: Path) -> None:
    """Bytes flipped inside the embedding page of an `embed-slides` parquet were read as other numbers."""
    from vlm.formats.embeddings import read_slide_embeddings, write_slide_embeddings

    rng = np.random.default_rng(0)
    rows = [{"slide_id": f"S-{i}", "embedding": rng.normal(size=256).astype(np.float32).tolist(), "n_tiles": 3,
             "encoder": "tiny", "pool": "mean"} for i in range(8)]
    path = tmp_path / "slides.parquet"
    write_slide_embeddings(path, rows, {"pool": "mean"})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the embedding values
    data[middle : middle + 16] = bytes(byte ^ 0xFF for byte in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"slides\.parquet: not a readable parquet file .*checksum"):
        read_slide_embeddings(path)


def test_retrieval_does_not_import_training() -> None:
    code = ("import sys, vlm.retrieval, vlm.retrieval.evaluate, vlm.commands.retrieval\n"
            "print(sorted(m for m in sys.modules\n"
            "             if m.startswith(('vlm.training', 'vlm.slide_embeddings'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_index_build_on_a_full_disk_says_so_and_where(
    world: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """FAISS's `write_index` on a full disk said "write error" (a RuntimeError the CLI blamed on the input file).

    2,000 slides make a 0.5 MB `index.faiss`, the first file written, in 64 kB of free space.
    """
    from tests.support.full_disk import full_disk

    slides = _slides(tmp_path / "many.parquet", [f"S-{i:04d}" for i in range(2000)])
    with full_disk(tmp_path / "full", room=64 << 10) as disk:
        argv = ["index", "build", "--model", str(world["model"]), "--embeddings", str(slides),
                "--out", str(disk / "index")]
        assert main(argv) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].startswith(f"disk full at {disk / 'index'} ("), errors
        assert "write error" not in errors[0] and "damaged or foreign" not in errors[0]
        assert not (disk / "index").exists()  # nothing half-written

"""The offline demo end to end (small scale) and the notebooks executed on its outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
def test_demo_writes_every_output_and_beats_chance(demo_out: Path) -> None:
    for name in ("summary.md", "roc.png", "confusion.png", "search.png", "align/model/model.safetensors",
                 "zeroshot/predictions.csv", "index/manifest.json", "search.json", "probe.png", "probe/metrics.json",
                 "encoders/tile_encoder.pth", "encoders/slide_encoder.pth", "new_slide.sh"):
        assert (demo_out / name).is_file(), name
    summary = (demo_out / "summary.md").read_text()
    assert "synthetic" in summary and "say nothing about clinical performance" in summary
    metrics = json.loads((demo_out / "zeroshot" / "metrics.json").read_text())["metrics"]
    assert metrics["balanced_accuracy"]["value"] >= 0.6  # chance is 1/3; run_demo itself refuses less
    predictions = pd.read_csv(demo_out / "zeroshot" / "predictions.csv")
    assert set(predictions["slide_id"]) == set(pd.read_csv(demo_out / "test_labels.csv")["slide_id"])
    # the held-out slides were never trained on
    splits = pd.read_csv(demo_out / "align" / "splits.csv")
    assert not set(splits.loc[splits["split"] == "train", "slide_id"]) & set(predictions["slide_id"])


@pytest.mark.slow
def test_demo_search_is_honest(demo_out: Path) -> None:
    """Search over held-out slides only, with wording that no training report contains."""
    import re

    search = json.loads((demo_out / "search.json").read_text())
    assert set(search) >= {"query", "results"} and len(search["results"]) == 5
    test_labels = pd.read_csv(demo_out / "test_labels.csv").set_index("slide_id")["label"]
    for hit in search["results"]:
        assert set(hit) == {"slide_id", "score", "split", "label"}
        assert hit["split"] == "test" and hit["slide_id"] in test_labels
        assert hit["label"] == test_labels[hit["slide_id"]]
    pairs = pd.read_csv(demo_out / "pairs.csv")
    words = re.findall(r"[a-z]+", search["query"].lower())
    bigrams = [" ".join(words[i : i + 2]) for i in range(len(words) - 1)]
    for report in pairs.loc[pairs["split"] == "train", "report"]:
        text = " " + " ".join(re.findall(r"[a-z]+", report.lower())) + " "
        assert not [b for b in bigrams if f" {b} " in text], report
    indexed = pd.read_parquet(demo_out / "index" / "metadata.parquet")
    assert set(indexed["slide_id"]) == set(test_labels.index)  # only held-out slides can be found
    summary = (demo_out / "summary.md").read_text()
    assert search["query"] in summary and "held-out slides only" in summary


@pytest.mark.slow
def test_demo_reports_the_supervised_baseline(demo_out: Path) -> None:
    probe = json.loads((demo_out / "probe" / "metrics.json").read_text())
    assert probe["n_test"] == len(pd.read_csv(demo_out / "test_labels.csv"))
    assert probe["zeroshot"]["metrics"]["balanced_accuracy"]["value"] is not None
    assert "Supervised baseline beside zero-shot" in (demo_out / "summary.md").read_text()


@pytest.mark.slow
def test_new_slide_script_runs_a_slide_through_the_demo_offline(demo_out: Path, tmp_path: Path) -> None:
    """new_slide.sh on the real slide reproduces the demo's own embedding of it, and zero-shot + search run."""
    import subprocess

    import numpy as np

    from vlm.formats.embeddings import read_slide_embeddings

    slide = Path(__file__).parent / "data" / "cmu_small_region.svs"
    out = tmp_path / "mine"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(["bash", str(demo_out / "new_slide.sh"), str(slide), str(out)], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "features" / "cmu_small_region.h5").is_file()
    mine = read_slide_embeddings(out / "slides.parquet").set_index("slide_id")["embedding"]
    demo = read_slide_embeddings(demo_out / "slides.parquet").set_index("slide_id")["embedding"]
    np.testing.assert_allclose(mine["cmu_small_region"], demo["cmu_small_region"], rtol=1e-4, atol=1e-5)
    predictions = pd.read_csv(out / "zeroshot" / "predictions.csv")
    assert list(predictions["slide_id"]) == ["cmu_small_region"]
    hits = json.loads((out / "search.json").read_text())
    assert len(hits) == 5 and all(hit["split"] == "test" for hit in hits)
    assert "new_slide.sh" in (demo_out / "summary.md").read_text()
    assert subprocess.run(["bash", str(demo_out / "new_slide.sh")], capture_output=True).returncode == 2


@pytest.mark.slow
def test_new_slide_script_takes_names_that_start_with_a_dash(demo_out: Path, tmp_path: Path) -> None:
    """`new_slide.sh -x.svs -out`: argparse read the slide as an unknown option and mkdir the folder as one."""
    import shutil
    import subprocess

    from vlm.demo.run import PROMPT_FILE, _write_new_slide_script

    demo = tmp_path / "demo"
    (demo / "encoders").mkdir(parents=True)
    for part in ("align", "index", "encoders/tile_encoder.pth", "encoders/slide_encoder.pth"):  # what it reads
        (demo / part).symlink_to(demo_out / part)
    shutil.copy(PROMPT_FILE, demo / "encoders" / PROMPT_FILE.name)  # this version's task file, as the demo does
    script = _write_new_slide_script(demo)
    shutil.copy(Path(__file__).parent / "data" / "cmu_small_region.svs", tmp_path / "-x.svs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(["bash", str(script), "-x.svs", "-out"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "-out"
    assert (out / "features" / "-x.h5").is_file()
    assert list(pd.read_csv(out / "zeroshot" / "predictions.csv")["slide_id"]) == ["-x"]
    assert len(json.loads((out / "search.json").read_text())) == 5


def test_demo_refuses_too_few_slides_per_class_up_front(tmp_path: Path) -> None:
    from vlm.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--per-class", "4", "--no-progress"]) == 2
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(notebook: Path, demo_out: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLM_DEMO_OUT", str(demo_out))
    monkeypatch.setenv("VLM_NOTEBOOK_OUT", str(tmp_path / "notebook_out"))
    demo_before = sorted(p.name for p in demo_out.iterdir())
    document = nbformat.read(notebook, as_version=4)
    assert all(not cell.get("outputs") for cell in document.cells if cell.cell_type == "code"), \
        f"{notebook.name}: outputs must be stripped in git"
    NotebookClient(document, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(notebook.parent)}}).execute()
    errors = [o for c in document.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # a notebook writes into its own folder (VLM_NOTEBOOK_OUT/<notebook>), never into the demo's
    assert sorted(p.name for p in demo_out.iterdir()) == demo_before
    written = tmp_path / "notebook_out" / notebook.stem
    assert written.is_dir(), f"{notebook.name} wrote nothing into {written}"


def test_three_notebooks_are_shipped() -> None:
    assert [p.stem for p in NOTEBOOKS] == [
        "01_zero_shot", "02_fine_tune_on_local_reports", "03_search_slides_by_phrase"]
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_demo_prompts_and_query_use_wording_no_training_report_has() -> None:
    """An honest showcase: zero-shot prompts and the search query share no word pair with the demo's reports
    (three synonyms and one template once did, and zero-shot accuracy fell from 0.917 to 0.750 without them)."""
    from vlm import load_prompt_task
    from vlm.demo import DEMO_SEARCH_QUERY, check_wording_unseen

    prompts = [p for ps in load_prompt_task("demo_morphology").expand().values() for p in ps]
    assert len(prompts) == 180
    for text in [*prompts, DEMO_SEARCH_QUERY]:
        check_wording_unseen(text)  # raises, naming the report, on a shared word pair
    with pytest.raises(ValueError, match="repeats training-report wording"):
        check_wording_unseen("gland forming carcinoma")

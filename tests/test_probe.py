"""`vlm probe`: the supervised linear-probe baseline beside zero-shot."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vlm.cli import main
from vlm.probe import parse_shots, run_probe

CLASSES = ("glandular", "papillary", "solid")


def _cohort(root: Path, separation: float, n_train: int = 12, n_test: int = 6, dim: int = 16) -> dict[str, Path]:
    """Slide embeddings = class prototype * separation + noise, in the parquet layout `vlm embed-slides` writes."""
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(len(CLASSES), dim))
    rows, train, test = [], [], []
    for c, name in enumerate(CLASSES):
        for i in range(n_train + n_test):
            slide_id = f"{name}-{i:02d}"
            rows.append({"slide_id": slide_id, "embedding": [float(v) for v in separation * prototypes[c]
                                                               + rng.normal(size=dim)],
                         "n_tiles": 10, "encoder": "tiny", "pool": "mean"})
            (train if i < n_train else test).append({"slide_id": slide_id, "label": name})
    root.mkdir(parents=True, exist_ok=True)
    paths = {"slides": root / "slides.parquet", "labels": root / "train.csv", "test": root / "test.csv"}
    pd.DataFrame(rows).to_parquet(paths["slides"])
    pd.DataFrame(train).to_csv(paths["labels"], index=False)
    pd.DataFrame(test).to_csv(paths["test"], index=False)
    return paths


def test_probe_learns_separable_classes_and_reports_every_shot(tmp_path: Path) -> None:
    data = _cohort(tmp_path / "data", separation=3.0)
    zeroshot = tmp_path / "zs.json"
    zeroshot.write_text(json.dumps({"n": 18, "metrics": {"balanced_accuracy": {"value": 0.5, "ci_low": 0.3,
                                                                               "ci_high": 0.7}}}))
    assert main(["probe", "--embeddings", str(data["slides"]), "--labels", str(data["labels"]), "--test-labels",
                 str(data["test"]), "--out", str(tmp_path / "probe"), "--shots", "1", "4", "16", "all",
                 "--seeds", "3", "--n-boot", "200", "--zeroshot", str(zeroshot)]) == 0
    report = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    by_shot = {str(entry["shots"]): entry for entry in report["shots"]}
    assert by_shot["16"]["skipped"]  # 12 training slides per class: 16-shot cannot be drawn
    assert by_shot["1"]["n_runs"] == 3 and by_shot["all"]["n_runs"] == 1
    assert [run["n_train"] for run in by_shot["4"]["runs"]] == [12, 12, 12]
    assert by_shot["1"]["runs"][0]["C_source"] == "fixed"  # one slide per class: no CV possible
    assert by_shot["all"]["runs"][0]["C_source"] == "5-fold CV"
    full = by_shot["all"]["metrics"]
    assert full["balanced_accuracy"]["value"] >= 0.9
    assert by_shot["1"]["metrics_seed"] in {run["seed"] for run in by_shot["1"]["runs"]}
    for name in ("balanced_accuracy", "auroc", "weighted_f1"):
        assert full[name]["ci_low"] <= full[name]["value"] <= full[name]["ci_high"]
    spread = by_shot["1"]["spread"]["balanced_accuracy"]
    assert spread["min"] <= spread["mean"] <= spread["max"] and spread["std"] is not None
    assert report["zeroshot"]["metrics"]["balanced_accuracy"]["value"] == 0.5
    predictions = pd.read_csv(tmp_path / "probe" / "predictions.csv")
    assert len(predictions) == 18 * (3 + 3 + 1)
    assert set(predictions["slide_id"]) == set(pd.read_csv(data["test"])["slide_id"])
    assert (tmp_path / "probe" / "probe.png").stat().st_size > 1000


def test_probe_is_at_chance_without_signal(tmp_path: Path) -> None:
    """No class structure in the embeddings: the probe must not report more than chance (no leak from test)."""
    data = _cohort(tmp_path / "data", separation=0.0, n_train=12, n_test=12)
    report = run_probe(data["slides"], data["labels"], data["test"], tmp_path / "probe", shots=["all"], n_boot=100)
    assert report["shots"][0]["metrics"]["balanced_accuracy"]["value"] < 0.6


def test_probe_does_not_depend_on_label_file_order(tmp_path: Path) -> None:
    data = _cohort(tmp_path / "data", separation=1.0)
    first = run_probe(data["slides"], data["labels"], data["test"], tmp_path / "a", shots=[2, "all"], seeds=2,
                      n_boot=100)
    for key in ("labels", "test"):
        frame = pd.read_csv(data[key])
        frame.sample(frac=1, random_state=1).to_csv(data[key], index=False)
    again = run_probe(data["slides"], data["labels"], data["test"], tmp_path / "b", shots=[2, "all"], seeds=2,
                      n_boot=100)
    assert again["shots"] == first["shots"]


def test_probe_refuses_leaks_unknown_labels_and_missing_slides(tmp_path: Path) -> None:
    data = _cohort(tmp_path / "data", separation=1.0)
    train = pd.read_csv(data["labels"])
    test = pd.read_csv(data["test"])
    leaky = tmp_path / "leaky.csv"
    pd.concat([test, train.head(1)]).to_csv(leaky, index=False)
    with pytest.raises(ValueError, match="in both"):
        run_probe(data["slides"], data["labels"], leaky, tmp_path / "out")
    unknown = tmp_path / "unknown.csv"
    test.assign(label="necrotic").to_csv(unknown, index=False)
    with pytest.raises(ValueError, match="never occur"):
        run_probe(data["slides"], data["labels"], unknown, tmp_path / "out")
    missing = tmp_path / "missing.csv"
    pd.concat([test, pd.DataFrame([{"slide_id": "ghost", "label": "solid"}])]).to_csv(missing, index=False)
    with pytest.raises(ValueError, match="no embedding"):
        run_probe(data["slides"], data["labels"], missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_probe_names_a_nan_embedding_and_keeps_ids_as_text(tmp_path: Path) -> None:
    """A NaN embedding is refused by slide id (not by scikit-learn's 'Input X contains NaN'); ids such as
    `0007` are read as text through the one table reader, so they still match the parquet's ids."""
    data = _cohort(tmp_path / "data", separation=3.0)
    frame = pd.read_parquet(data["slides"])
    renamed = {old: f"{i:04d}" for i, old in enumerate(frame["slide_id"])}
    frame["slide_id"] = frame["slide_id"].map(renamed)
    frame.to_parquet(data["slides"])
    for key in ("labels", "test"):
        pd.read_csv(data[key]).assign(slide_id=lambda f: f["slide_id"].map(renamed)).to_csv(data[key], index=False)
    report = run_probe(data["slides"], data["labels"], data["test"], tmp_path / "ok", shots=["all"], n_boot=20)
    assert report["n_train"] == 36 and report["n_test"] == 18
    broken = pd.read_csv(data["test"], dtype=str)["slide_id"].iloc[0]
    frame["embedding"] = [[float("nan")] * len(e) if s == broken else list(e)
                          for s, e in zip(frame["slide_id"], frame["embedding"], strict=True)]
    frame.to_parquet(data["slides"])
    with pytest.raises(ValueError, match=f"NaN or infinite.*{broken}"):
        run_probe(data["slides"], data["labels"], data["test"], tmp_path / "nan", shots=["all"], n_boot=20)


@pytest.mark.parametrize("shots", [["0"], ["two"], ["1", "1"], []])
def test_bad_shot_counts_are_refused(shots: list[str]) -> None:
    with pytest.raises(ValueError, match="`shots`"):
        parse_shots(shots)


def test_a_stray_training_label_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A spreadsheet's literal "NaN" label became a 4th class of one slide; every k-shot row was then skipped
    with only "the smallest class has 1 training slides", naming neither the class nor its file."""
    data = _cohort(tmp_path / "data", separation=3.0)
    train = pd.read_csv(data["labels"])
    train.loc[0, "label"] = "NaN"
    train.to_csv(data["labels"], index=False)
    run_probe(data["slides"], data["labels"], data["test"], tmp_path / "out", shots=["2", "all"], seeds=1, n_boot=10)
    assert "label(s) ['NaN'] occur in no slide of" in caplog.text
    assert "2-shot skipped: class 'NaN' has 1 training slides" in caplog.text
    skipped = json.loads((tmp_path / "out" / "metrics.json").read_text())["shots"][0]
    assert skipped == {"shots": 2, "skipped": "class 'NaN' has only 1 training slides"}


def test_shots_that_no_class_can_fill_are_one_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`--shots 4 8` with one training slide per class exited 0 with a 1-byte predictions.csv and no results."""
    data = _cohort(tmp_path / "data", separation=3.0, n_train=1)
    out = tmp_path / "probe"
    argv = ["probe", "--embeddings", str(data["slides"]), "--labels", str(data["labels"]), "--test-labels",
            str(data["test"]), "--out", str(out), "--shots", "4", "8", "--n-boot", "10"]
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(data["labels"]) in errors[0], errors
    assert "(4 8) can be drawn: class 'glandular' has 1 training slides" in errors[0]
    assert not out.exists()  # nothing written
    assert main([*argv[:-4], "1", "8", "--n-boot", "10"]) == 0  # the shots that can run do, the others say why
    shots = json.loads((out / "metrics.json").read_text())["shots"]
    assert shots[0]["n_runs"] == 5
    assert shots[1] == {"shots": 8, "skipped": "class 'glandular' has only 1 training slides"}


def test_probe_case_level_counts_cases(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--level case: 3 slides per patient; shots draw patients, test metrics are over patients."""
    data = _cohort(tmp_path / "data", separation=3.0)
    for name in ("labels", "test"):
        table = pd.read_csv(data[name])
        table["patient_id"] = [f"{s[:-3]}-P{int(s[-2:]) // 3}" for s in table["slide_id"]]
        table.to_csv(data[name], index=False)
    argv = ["probe", "--embeddings", str(data["slides"]), "--labels", str(data["labels"]), "--test-labels",
            str(data["test"]), "--shots", "1", "all", "--seeds", "2", "--n-boot", "50", "--level", "case"]
    assert main([*argv, "--out", str(tmp_path / "probe")]) == 0
    report = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert report["level"] == "case" and report["n_test"] == 6 and report["n_test_slides"] == 18
    assert report["n_train_cases"] == 12 and report["support_test"] == {name: 2 for name in CLASSES}
    by_shot = {str(entry["shots"]): entry for entry in report["shots"]}
    assert [run["n_train"] for run in by_shot["1"]["runs"]] == [9, 9]  # one patient (3 slides) per class
    assert by_shot["all"]["runs"][0]["C_source"] == "4-fold CV"  # 4 patients per class: folds by patient
    assert by_shot["all"]["metrics"]["balanced_accuracy"]["value"] >= 0.9
    predictions = pd.read_csv(tmp_path / "probe" / "predictions.csv")
    assert list(predictions.columns[:4]) == ["patient_id", "slide_ids", "shots", "seed"]
    assert len(predictions) == 6 * 3 and "glandular-12;glandular-13;glandular-14" in set(predictions["slide_ids"])
    np.testing.assert_allclose(predictions.filter(like="p_").sum(axis=1), 1, atol=1e-6)

    test = pd.read_csv(data["test"])
    test.loc[0, "patient_id"] = "glandular-P0"  # a training patient's slide in the test table
    test.to_csv(data["test"], index=False)
    assert main([*argv, "--out", str(tmp_path / "leak")]) != 0
    assert "1 patient(s) have slides in both" in caplog.text and not (tmp_path / "leak").exists()

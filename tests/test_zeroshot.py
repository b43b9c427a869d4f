"""Zero-shot: ensemble math, prompt cache, scoring, separability, and the `vlm zeroshot` job end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from tests.support.models import build_tiny_model
from vlm.cli import main
from vlm.model.clip import SlideTextModel
from vlm.model.zeroshot import ZeroShotClassifier, zero_shot_probabilities

PROMPTS = Path(__file__).resolve().parents[1] / "prompts"
NSCLC = PROMPTS / "nsclc_subtyping.yaml"
TITAN_CONFIG = Path(__file__).resolve().parent / "fixtures" / "prompts" / "titan_config_tcga-ot.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("zeroshot")
    build_tiny_model(folder / "build").save_pretrained(folder / "model")
    return folder / "model"


@pytest.fixture(scope="module")
def model(model_dir: Path) -> SlideTextModel:
    return SlideTextModel.from_pretrained(model_dir)


def _count_text_calls(model: SlideTextModel, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many texts each `encode_text` call encodes (the real method still runs)."""
    calls: list[int] = []
    original = model.encode_text

    def counting(texts, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(len(texts))
        return original(texts, *args, **kwargs)

    monkeypatch.setattr(model, "encode_text", counting)
    return calls


def _slides_from_text(model: SlideTextModel, texts: list[str], labels: np.ndarray, noise: float) -> np.ndarray:
    """Unprojected slide embeddings whose projection is the text embedding of their class description.

    The slide head is linear and wider on its input side, so the pseudo-inverse solves it exactly; noise is
    added in the joint space. Class information then really is present, and only the code path decides
    whether zero-shot recovers it.
    """
    targets = model.encode_text(texts)[labels]  # [N, D]
    generator = torch.Generator().manual_seed(0)
    targets = targets + noise * torch.randn(targets.shape, generator=generator)
    weight = model.slide_proj.net.weight.detach()  # [D, E]
    return (targets @ torch.linalg.pinv(weight).T).numpy()


def test_prototypes_equal_independent_normalise_mean_normalise(model: SlideTextModel, tmp_path: Path) -> None:
    classifier = ZeroShotClassifier.from_prompt_file(model, NSCLC, cache_dir=tmp_path)
    used = classifier.prompts_used()["prompts"]
    task = classifier.task
    for index, code in enumerate(task.classes):
        prompts = used[code]
        assert len(prompts) == len(task.prompt_sets[0].classnames[code]) * len(task.prompt_sets[0].templates)
        with torch.no_grad():
            raw = model.text_proj(model.text(**model.text.tokenize(prompts)))  # unnormalised [P, D]
        expected = F.normalize(F.normalize(raw, dim=-1).mean(dim=0), dim=-1)
        torch.testing.assert_close(classifier.prototypes[index], expected, atol=1e-5, rtol=1e-5)


def test_scoring_is_softmax_of_scaled_cosine(model: SlideTextModel, tmp_path: Path) -> None:
    classifier = ZeroShotClassifier.from_prompt_file(model, NSCLC, cache_dir=tmp_path)
    slides = torch.randn(5, model.config.slide_embed_dim)
    with torch.no_grad():
        projected = F.normalize(model.slide_proj(slides), dim=-1)
        expected = (model.scale() * projected @ classifier.prototypes.T).softmax(-1)
    np.testing.assert_allclose(classifier.predict(slides), expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(zero_shot_probabilities(model, slides, classifier.prototypes).sum(1), 1, atol=1e-6)


SMALL_TASK = """\
type: multiclass
classes:
  LUAD: [lung adenocarcinoma, pulmonary adenocarcinoma]
  LUSC: [lung squamous cell carcinoma]
templates: ["CLASSNAME.", "an H&E image of CLASSNAME.", "histology shows CLASSNAME."]
...
"""


def test_second_run_does_no_text_encoding_and_edits_miss(
    model: SlideTextModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = tmp_path / "small.yaml"
    task.write_text(SMALL_TASK)
    calls = _count_text_calls(model, monkeypatch)
    cache = tmp_path / "cache"
    first = ZeroShotClassifier.from_prompt_file(model, task, cache_dir=cache)
    assert calls == [9] and len(list(cache.glob("*.safetensors"))) == 1
    second = ZeroShotClassifier.from_prompt_file(model, task, cache_dir=cache)
    assert calls == [9]  # served from the cache
    torch.testing.assert_close(first.prototypes, second.prototypes)
    edited = tmp_path / "edited.yaml"
    edited.write_text(SMALL_TASK.replace("pulmonary adenocarcinoma", "primary lung adenocarcinoma"))
    ZeroShotClassifier.from_prompt_file(model, edited, cache_dir=cache)
    assert calls == [9, 9] and len(list(cache.glob("*.safetensors"))) == 2
    ZeroShotClassifier.from_prompt_file(model, task, cache_dir=tmp_path / "off", use_cache=False)
    assert len(calls) == 3 and not (tmp_path / "off").exists()


def test_changed_text_weights_miss_the_cache(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = tmp_path / "small.yaml"
    task.write_text(SMALL_TASK)
    other = SlideTextModel.from_pretrained(model_dir)
    ZeroShotClassifier.from_prompt_file(other, task, cache_dir=tmp_path)
    with torch.no_grad():
        next(other.text_proj.parameters()).add_(0.01)
    calls = _count_text_calls(other, monkeypatch)
    ZeroShotClassifier.from_prompt_file(other, task, cache_dir=tmp_path)
    assert calls == [9]


@pytest.mark.parametrize(
    ("task", "descriptions"),
    [
        (
            "nsclc_subtyping",
            ["the slide shows lung adenocarcinoma", "the slide shows lung squamous cell carcinoma"],
        ),
        (
            "rcc_subtyping",
            [
                "the slide shows clear cell renal cell carcinoma",
                "the slide shows papillary renal cell carcinoma",
                "the slide shows chromophobe renal cell carcinoma",
            ],
        ),
    ],
)
def test_zero_shot_recovers_class_information(
    model: SlideTextModel, tmp_path: Path, task: str, descriptions: list[str]
) -> None:
    from vlm.metrics import classification_point_metrics

    classifier = ZeroShotClassifier.from_prompt_file(model, PROMPTS / f"{task}.yaml", cache_dir=tmp_path)
    n_classes = len(descriptions)
    labels = np.arange(60) % n_classes
    # Noise at a third of the prototypes' spread: the tiny random text model puts all texts close together.
    noise = 0.3 * float(torch.cdist(classifier.prototypes, classifier.prototypes).max()) / model.config.proj_dim**0.5
    slides = _slides_from_text(model, descriptions, labels, noise)
    accuracy = classification_point_metrics(labels, classifier.predict(slides), None)["balanced_accuracy"]
    assert accuracy >= 0.9 > 1 / n_classes + 0.3
    # Control: descriptions assigned to the wrong classes must not score well.
    shifted = _slides_from_text(model, descriptions, (labels + 1) % n_classes, noise)
    assert classification_point_metrics(labels, classifier.predict(shifted), None)["balanced_accuracy"] < 0.3


# --- the CLI job --------------------------------------------------------------------------------------


def _write_inputs(folder: Path, embeddings: np.ndarray, labels: list[str | None]) -> tuple[Path, Path]:
    ids = [f"TCGA-{i:02d}" for i in range(len(embeddings))]
    slides = folder / "slides.parquet"
    pd.DataFrame(
        {
            "slide_id": ids,
            "embedding": list(embeddings.astype(np.float32)),
            "n_tiles": 100,
            "encoder": "tiny",
            "pool": "mean",
        }
    ).to_parquet(slides)
    rows = [(i, label) for i, label in zip(ids, labels, strict=True) if label is not None]
    labels_csv = folder / "labels.csv"
    pd.DataFrame(rows, columns=["slide_id", "label"]).to_csv(labels_csv, index=False)
    return slides, labels_csv


def _zeroshot(model_dir: Path, slides: Path, out: Path, *extra: str) -> int:
    args = ["zeroshot", "--model", str(model_dir), "--embeddings", str(slides), "--out", str(out)]
    return main([*args, "--cache-dir", str(out.parent / "cache"), "--n-boot", "50", *extra])


def test_cli_end_to_end(
    model: SlideTextModel, model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    descriptions = ["the slide shows lung adenocarcinoma", "the slide shows lung squamous cell carcinoma"]
    truth = np.arange(24) % 2
    embeddings = _slides_from_text(model, descriptions, truth, noise=2e-4)
    labels: list[str | None] = ["LUAD" if t == 0 else "Lung squamous cell carcinoma" for t in truth]
    labels[5], labels[6] = "mesothelioma", None  # unknown label; unlabelled slide
    slides, labels_csv = _write_inputs(tmp_path, embeddings, labels)
    out = tmp_path / "zs"
    with caplog.at_level(logging.INFO):
        assert _zeroshot(model_dir, slides, out, "--task", str(NSCLC), "--labels", str(labels_csv)) == 0
    names = {"predictions.csv", "metrics.json", "roc.png", "confusion.png", "prompts_used.json", "run.json"}
    assert names <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.part"))
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["slide_id", "LUAD", "LUSC", "predicted", "label"]
    np.testing.assert_allclose(predictions[["LUAD", "LUSC"]].sum(axis=1), 1, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unknown_labels"] == {"TCGA-05": "mesothelioma"}
    assert metrics["unlabelled_slides"] == ["TCGA-06"]
    assert metrics["n_evaluated"] == 22 and metrics["n_scored"] == 24
    assert metrics["metrics"]["balanced_accuracy"]["value"] > 0.8
    assert "mesothelioma" in caplog.text and "TCGA-06" in caplog.text
    used = json.loads((out / "prompts_used.json").read_text())
    assert len(used["prompts"]["LUAD"]) == 5 * 18 and used["prompts"]["LUAD"][0] == "adenocarcinoma."
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert _zeroshot(model_dir, slides, out, "--task", str(NSCLC)) == 0  # no labels now
    assert "cache hit" in caplog.text and "encoding 180 prompts" not in caplog.text
    assert not (out / "metrics.json").exists()  # stale metrics of the labelled run are removed


def test_cli_classes_and_mizero_sets(model: SlideTextModel, model_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    slides, labels_csv = _write_inputs(tmp_path, rng.normal(size=(20, 64)), ["a" if i % 2 else "b" for i in range(20)])
    out = tmp_path / "classes"
    assert (
        _zeroshot(
            model_dir,
            slides,
            out,
            "--classes",
            "a=lung adenocarcinoma|adenocarcinoma",
            "b=squamous cell carcinoma",
            "--positive",
            "a",
            "--labels",
            str(labels_csv),
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["positive"] == "a" and set(metrics["metrics"]) >= {"auroc", "auprc", "cohen_kappa"}

    sets = {
        str(i): {"classnames": {"a": a, "b": b}, "templates": ["CLASSNAME.", "an image of CLASSNAME."]}
        for i, (a, b) in enumerate(
            [
                ("adenocarcinoma", "squamous cell carcinoma"),
                ("lung adenocarcinoma", "lung squamous cell carcinoma"),
                ("pulmonary adenocarcinoma", "squamous carcinoma"),
            ]
        )
    }
    mizero = tmp_path / "mizero.json"
    mizero.write_text(json.dumps(sets))
    out = tmp_path / "mizero"
    assert _zeroshot(model_dir, slides, out, "--task", str(mizero), "--labels", str(labels_csv)) == 0
    summary = json.loads((out / "metrics.json").read_text())["prompt_sets"]
    assert summary["n_sets"] == 3 and len(summary["per_set"]) == 3
    values = sorted(row["balanced_accuracy"] for row in summary["per_set"])
    assert summary["summary"]["balanced_accuracy"]["median"] == pytest.approx(values[1])
    assert summary["summary"]["balanced_accuracy"]["min"] == pytest.approx(values[0])


def test_cli_bad_inputs_fail_cleanly(model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    slides, labels_csv = _write_inputs(tmp_path, rng.normal(size=(6, 64)), ["LUAD", "LUSC"] * 3)
    (tmp_path / "narrow").mkdir()
    narrow, _ = _write_inputs(tmp_path / "narrow", rng.normal(size=(6, 48)), ["LUAD"] * 6)
    extra = tmp_path / "extra_labels.csv"
    extra.write_text(labels_csv.read_text() + "TCGA-99,LUAD\n")
    cases = {
        "neither": ([], "exactly one of --task"),
        "unknown-ids": (["--task", str(NSCLC), "--labels", str(extra)], "TCGA-99"),
        "width": (["--task", str(NSCLC)], "48-d"),
        "features-no-encoder": (["--task", str(NSCLC)], "vlm embed-slides"),
    }
    for name, (extra_args, message) in cases.items():
        caplog.clear()
        source = {"width": narrow, "features-no-encoder": tmp_path}.get(name, slides)
        out = tmp_path / f"out-{name}"
        with caplog.at_level(logging.ERROR):
            assert _zeroshot(model_dir, source, out, *extra_args) == 2, name
        assert message in caplog.text, name
        assert not out.exists() or not any(out.iterdir()), name
    with pytest.raises(SystemExit):  # argparse: --task and --classes together
        _zeroshot(model_dir, slides, tmp_path / "both", "--task", str(NSCLC), "--classes", "a=x", "b=y")


@pytest.mark.slow
def test_cli_embeds_a_features_folder_with_the_models_slide_encoder(tmp_path: Path) -> None:
    from vlm.formats.features import TileFeatures, TileGrid, write_features

    build_tiny_model(tmp_path / "build", slide_encoder="tiny").save_pretrained(tmp_path / "model")
    features = tmp_path / "features"
    features.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        coords = rng.choice(50, size=(20, 2)) * 512  # level-0 px at 0.25 mpp: 256 px tiles at 0.5 mpp
        grid = TileGrid(coords=coords, mpp=0.25, tile_size=256, target_mpp=0.5, tile_size_level0=512)
        tiles = TileFeatures(grid=grid, features=rng.standard_normal((20, 32)).astype(np.float32))
        write_features(features / f"slide-{index}.h5", tiles)
    out = tmp_path / "zs"
    argv = ["zeroshot", "--model", str(tmp_path / "model"), "--features", str(features), "--out", str(out),
            "--task", str(NSCLC), "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--precision", "fp32"]
    assert main(argv) == 0
    predictions = pd.read_csv(out / "predictions.csv")
    assert sorted(predictions["slide_id"]) == ["slide-0", "slide-1", "slide-2"]
    assert (out / "slide_embeddings.parquet").is_file()
    run = json.loads((out / "run.json").read_text())
    assert (run["slides"], run["precision"]) == (str(features), "fp32")  # the folder the user gave, not the parquet


def test_mizero_headline_is_the_median_over_prompt_sets(
    model: SlideTextModel, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """MI-Zero scores every prompt set on its own and reports the median (src/slidelevel_zeroshot_multiprompt.py,
    `median_baccs`); that is the headline here, with the pooled ensemble of all sets beside it, named so.
    The file is written the way MI-Zero's src/presample_prompts.py writes src/prompts/nsclc_prompts.json, and
    labels come from `OncoTreeCode`, MI-Zero's `target_col` (its src/data_csvs/tcga_rcc_zeroshot_example.csv)."""
    from sklearn.metrics import balanced_accuracy_score

    from tests.support.peers import write_mizero_file
    from vlm.prompts import load_prompt_task, task_from_classes

    prompt_file = write_mizero_file(tmp_path / "nsclc_prompts.json", iters=9, seed=3)
    descriptions = ["the slide shows lung adenocarcinoma", "the slide shows lung squamous cell carcinoma"]
    truth = np.arange(40) % 2
    embeddings = _slides_from_text(model, descriptions, truth, noise=0.02)
    slides, _ = _write_inputs(tmp_path, embeddings, ["x"] * 40)
    labels_csv = tmp_path / "tcga_nsclc_zeroshot.csv"
    pd.DataFrame(
        {
            "slide_id": [f"TCGA-{i:02d}" for i in range(40)],
            "project_id": ["TCGA-LUAD" if t == 0 else "TCGA-LUSC" for t in truth],
            "OncoTreeCode": ["LUAD" if t == 0 else "LUSC" for t in truth],
        }
    ).to_csv(labels_csv, index=False)
    out = tmp_path / "mizero"
    assert _zeroshot(model_dir, slides, out, "--task", str(prompt_file), "--labels", str(labels_csv)) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["headline"] == "median_over_prompt_sets" and metrics["label_column"] == "OncoTreeCode"

    per_set = []  # each set as its own classifier, built independently of the multi-set code
    for prompt_set in load_prompt_task(prompt_file).prompt_sets:
        task = task_from_classes({c: list(s) for c, s in prompt_set.classnames.items()}, prompt_set.templates)
        probabilities = ZeroShotClassifier(model, task, use_cache=False).predict(embeddings)
        per_set.append(balanced_accuracy_score(truth, probabilities.argmax(axis=1)))
    headline = metrics["metrics"]["balanced_accuracy"]
    assert headline["value"] == pytest.approx(float(np.median(per_set)), abs=1e-9)
    assert headline["min"] == pytest.approx(min(per_set)) and headline["max"] == pytest.approx(max(per_set))
    assert len(set(np.round(per_set, 6))) > 1  # the sets really differ, so median ≠ any pooled value by accident

    pooled = metrics["pooled_ensemble"]
    predictions = pd.read_csv(out / "predictions.csv")
    pooled_bacc = balanced_accuracy_score(predictions["label"], predictions["predicted"])
    assert pooled["metrics"]["balanced_accuracy"]["value"] == pytest.approx(pooled_bacc)
    assert pooled["metrics"]["balanced_accuracy"]["ci_low"] is not None
    assert "median over 9 prompt sets" in printed and "pooled ensemble" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["headline"] == "median_over_prompt_sets" and run["predictions"].startswith("pooled ensemble")


@pytest.mark.slow  # 5,313 prompts and a 46-class confusion figure
def test_titan_real_config_end_to_end(model: SlideTextModel, model_dir: Path, tmp_path: Path) -> None:
    """TITAN's real config_tcga-ot.yaml as its notebooks/zeroshot_demo.ipynb uses it (cells 5, 7, 10, 13): classes
    in `label_dict` order, TITAN's templates, and each slide's label read from `task_csv[target]` of a CSV with
    TITAN's columns (datasets/tcga-ot_test.csv header), no --label-column needed."""
    import yaml

    config = yaml.safe_load(TITAN_CONFIG.read_text())
    order = sorted(config["label_dict"], key=config["label_dict"].get)
    codes = ["LUAD", "LUSC", "IDC", "ILC", "CCRCC", "ASTR", "AASTR", "GBM"] * 3
    rng = np.random.default_rng(0)
    slides, _ = _write_inputs(tmp_path, rng.normal(size=(len(codes), 64)), ["x"] * len(codes))
    header = "slide_id,case_id,project_id,sex,OncoTreeCode,OncoTreeSiteCode,site,source_site"
    rows = [f"TCGA-{i:02d},TCGA-{i:02d},TCGA-X,F,{code},SITE,XX,Somewhere" for i, code in enumerate(codes)]
    labels_csv = tmp_path / "tcga-ot_test.csv"
    labels_csv.write_text("\n".join([header, *rows]) + "\n")
    out = tmp_path / "titan"
    assert _zeroshot(model_dir, slides, out, "--task", str(TITAN_CONFIG), "--labels", str(labels_csv)) == 0
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["slide_id", *order, "predicted", "label"]
    assert list(predictions["label"]) == codes
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label_column"] == "OncoTreeCode" and metrics["n_evaluated"] == len(codes)
    used = json.loads((out / "prompts_used.json").read_text())
    assert len(used["prompts"]["ASTR"]) == 7 * 23 and "I observe anaplastic astrocytoma." in used["prompts"]["ASTR"]


def test_titan_labels_default_to_its_target_column(tmp_path: Path) -> None:
    """TITAN's notebook reads labels as `label_dict[task_csv[target]]`; vlm reads the same column unasked."""
    from vlm.prompts import load_prompt_task
    from vlm.zeroshot import match_labels, read_labels

    task = load_prompt_task(TITAN_CONFIG)
    labels_csv = tmp_path / "tcga-ot_test.csv"
    labels_csv.write_text("slide_id,project_id,OncoTreeCode\ns1,TCGA-BRCA,IDC\ns2,TCGA-LUAD,LUAD\n")
    raw, column = read_labels(labels_csv, task)
    assert column == "OncoTreeCode"
    targets, _ = match_labels(["s1", "s2"], raw, task)
    assert [task.classes[t] for t in targets] == ["IDC", "LUAD"]


def test_cli_case_level_means_the_slides_logits(
    model: SlideTextModel, model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--level case: one row per patient_id, softmax of the mean of its slides' logits, metrics over cases."""
    descriptions = ["the slide shows lung adenocarcinoma", "the slide shows lung squamous cell carcinoma"]
    truth = np.repeat(np.arange(8) % 2, 3)  # 8 cases x 3 slides, one label per case
    embeddings = _slides_from_text(model, descriptions, truth, noise=0.05)
    slides, labels_csv = _write_inputs(tmp_path, embeddings, ["LUAD" if t == 0 else "LUSC" for t in truth])
    table = pd.read_csv(labels_csv)
    table["patient_id"] = [f"P{i // 3}" for i in range(len(table))]
    table.to_csv(labels_csv, index=False)
    assert _zeroshot(model_dir, slides, tmp_path / "slide", "--task", str(NSCLC), "--labels", str(labels_csv)) == 0
    assert _zeroshot(model_dir, slides, tmp_path / "case", "--task", str(NSCLC), "--labels", str(labels_csv),
                     "--level", "case") == 0
    per_slide = pd.read_csv(tmp_path / "slide" / "predictions.csv")
    per_case = pd.read_csv(tmp_path / "case" / "predictions.csv")
    assert list(per_case.columns) == ["patient_id", "slide_ids", "LUAD", "LUSC", "predicted", "label"]
    assert per_case["patient_id"].tolist() == [f"P{i}" for i in range(8)]
    assert per_case["slide_ids"][1] == "TCGA-03;TCGA-04;TCGA-05"
    # softmax is shift-invariant per slide, so the mean of log-probabilities stands in for the mean of logits
    log_p = np.log(per_slide[["LUAD", "LUSC"]].to_numpy()).reshape(8, 3, 2).mean(axis=1)
    expected = np.exp(log_p) / np.exp(log_p).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(per_case[["LUAD", "LUSC"]].to_numpy(), expected, atol=1e-5)
    metrics = json.loads((tmp_path / "case" / "metrics.json").read_text())
    assert metrics["level"] == "case" and metrics["n"] == 8 and metrics["n_scored"] == 8
    assert json.loads((tmp_path / "case" / "run.json").read_text())["n_cases"] == 8

    table.loc[1, "label"] = "LUSC"  # P0's slides now disagree
    table.to_csv(labels_csv, index=False)
    args = ("--task", str(NSCLC), "--labels", str(labels_csv), "--level", "case")
    caplog.clear()
    assert _zeroshot(model_dir, slides, tmp_path / "mixed", *args) != 0
    assert "1 case(s) have slides with different labels (P0: ['LUAD', 'LUSC'])" in caplog.text
    table.drop(columns="patient_id").to_csv(labels_csv, index=False)
    assert _zeroshot(model_dir, slides, tmp_path / "nocase", *args) != 0
    assert "--level case needs a 'patient_id' column" in caplog.text
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "nocase").exists()


def test_the_result_in_memory_is_what_the_job_writes(model: SlideTextModel, model_dir: Path, tmp_path: Path) -> None:
    """`classify_zero_shot` needs no folder; `write_zeroshot` of its result gives the job's files byte for byte
    (run.json aside, which names the model as given)."""
    from vlm import ZeroShotResult, classify_zero_shot, run_zeroshot, write_zeroshot

    descriptions = ["the slide shows lung adenocarcinoma", "the slide shows lung squamous cell carcinoma"]
    truth = np.arange(12) % 2
    slides, labels = _write_inputs(tmp_path, _slides_from_text(model, descriptions, truth, 0.05),
                                   [["LUAD", "LUSC"][t] for t in truth])
    common = dict(task=NSCLC, labels=labels, cache_dir=tmp_path / "cache", n_boot=30, seed=1)
    result = classify_zero_shot(model_dir, slides, **common)
    assert isinstance(result, ZeroShotResult) and not (tmp_path / "mem").exists()
    assert result.ids == [f"TCGA-{i:02d}" for i in range(12)]
    assert result.probabilities.shape == (12, 2)
    assert result.predicted == [result.task.classes[i] for i in result.probabilities.argmax(1)]
    assert result.metrics is not None and result.targets is not None
    summary = run_zeroshot(model_dir, slides, tmp_path / "job", **common, progress=False)
    assert summary == result.metrics
    write_zeroshot(result, tmp_path / "mem")
    for name in ("predictions.csv", "metrics.json", "prompts_used.json", "roc.png", "confusion.png"):
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "job" / name).read_bytes(), name
    assert json.loads((tmp_path / "mem" / "run.json").read_text()) == json.loads(
        (tmp_path / "job" / "run.json").read_text()
    )


def test_run_zeroshot_refuses_a_features_folder_it_is_not_told_how_to_embed(model_dir: Path, tmp_path: Path) -> None:
    """The library scores embeddings; a folder is embedded by `vlm zeroshot --features` (or `embed=`)."""
    from vlm.zeroshot import run_zeroshot

    (tmp_path / "features").mkdir()
    with pytest.raises(ValueError, match=r"features is a folder, not a slide-embeddings parquet: .*--features"):
        run_zeroshot(model_dir, tmp_path / "features", tmp_path / "zs", task=NSCLC, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "zs").exists()

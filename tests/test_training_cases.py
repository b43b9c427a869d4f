"""Cases of several slides: one report per case, never its own negative in training, every slide a hit in metrics.

The cohort is the situation of a TCGA case with several diagnostic slides: each case's report sits beside each
of its slides in pairs.csv, and the slides are near-identical (one tumour, several sections).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.support.models import build_tiny_text_encoder
from tests.support.synthetic import DIAGNOSES, DIM, GRADES
from vlm.cli import main as cli_main
from vlm.formats.pairs import Pairs
from vlm.metrics import retrieval_recalls
from vlm.training.batches import case_batches, case_steps
from vlm.training.config import TrainConfig
from vlm.training.loop import train

SLIDES_PER_CASE = 3


def write_cohort(root: Path, n_train: int = 12, n_val: int = 4, patient_column: bool = True) -> tuple[Path, Path]:
    """Cases of 3 near-identical slides (validation: identical) with one report per case, given as patient_id."""
    rng = np.random.default_rng(0)
    diag, grade = rng.normal(size=(len(DIAGNOSES), DIM)), rng.normal(size=(len(GRADES), DIM))
    rows, slides = [], []
    for case in range(n_train + n_val):
        a, b = case % len(DIAGNOSES), (case * 5) % len(GRADES)
        split = "train" if case < n_train else "val"
        centre = diag[a] + grade[b]
        for k in range(SLIDES_PER_CASE):
            row = {"slide_id": f"c{case}-s{k}", "report": f"{GRADES[b]} grade {DIAGNOSES[a]}", "split": split}
            if patient_column:
                row["patient_id"] = f"c{case}"
            rows.append(row)
            noise = 0.01 * rng.normal(size=DIM) if split == "train" else 0.0
            slides.append({"slide_id": f"c{case}-s{k}", "embedding": [float(x) for x in centre + noise]})
    pairs, embeddings = root / "pairs.csv", root / "slides.parquet"
    pd.DataFrame(rows).to_csv(pairs, index=False)
    pd.DataFrame(slides).assign(n_tiles=10, encoder="tiny", pool="mean").to_parquet(embeddings)
    return pairs, embeddings


def run(root: Path, name: str, pairs: Path, embeddings: Path, **overrides: object) -> list[dict]:
    values: dict[str, object] = dict(
        pairs=str(pairs), out=str(root / name), embeddings=str(embeddings), text_encoder=str(root / "text"),
        max_length=16, proj_dim=16, epochs=EPOCHS, batch_size=16, lr=5e-3,
    )
    values.update(overrides)
    train(TrainConfig(**values))  # type: ignore[arg-type]
    return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]


EPOCHS, N_TRAIN = 20, 8


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cases")
    pairs, embeddings = write_cohort(root, n_train=N_TRAIN, n_val=4)
    build_tiny_text_encoder(root / "text", dropout=0.0)
    return {"root": root, "pairs": pairs, "embeddings": embeddings}


@pytest.fixture(scope="module")
def case_run(cohort: dict[str, Path]) -> list[dict]:
    """The cohort trained with case batches (the default)."""
    return run(cohort["root"], "cases", cohort["pairs"], cohort["embeddings"])


def self_negative_floor(epoch: int, step: int, batch_size: int) -> float:
    """The least CLIP loss a plain shuffled batch allows: its slide→report half has, for a slide whose case
    has c rows in the batch, c identical report columns, so softmax gives the right one at most 1/c: loss >=
    mean(log c) / 2 (half of the symmetric loss). The batch is the one `train` draws (seed 0)."""
    order = torch.randperm(N_TRAIN * SLIDES_PER_CASE, generator=torch.Generator().manual_seed(epoch)).tolist()
    cases = [p // SLIDES_PER_CASE for p in order[step * batch_size : (step + 1) * batch_size]]
    return float(np.mean([math.log(cases.count(c)) for c in cases])) / 2


def test_case_rule_joins_patient_report_and_slide() -> None:
    slides, reports = ["a", "b", "c", "d", "e", "a"], ["r1", "r2", "r2", "r3", "r4", "r5"]
    pairs = Pairs(slides, reports, ["p1", "p2", "p3", "p3", "p4", "p5"])
    # b~c by report, c~d by patient, a's two rows by slide; e alone
    assert pairs.cases() == [0, 1, 1, 1, 2, 0]
    assert Pairs(["a", "b"], ["x", "y"]).cases() == [0, 1]


def test_case_batches_hold_one_slide_per_case_and_visit_every_slide() -> None:
    cases = [c for c in range(20) for _ in range(4)]  # the cohort: 20 cases x 4 slides, batch 16
    assert case_steps(cases, 16) == 5
    batches = case_batches(cases, 16, torch.Generator().manual_seed(0))
    assert len(batches) == 5 and all(len(b) == 16 for b in batches)
    assert all(len({cases[p] for p in b}) == 16 for b in batches)
    assert sorted(p for b in batches for p in b) == list(range(80))
    again = case_batches(cases, 16, torch.Generator().manual_seed(0))
    assert again == batches  # every torchrun rank and a resumed run build the same batches
    # a case larger than the epoch's steps gives one slide per batch; the others still fill them
    skewed = [0] * 10 + list(range(1, 13))
    batches = case_batches(skewed, 4, torch.Generator().manual_seed(1))
    assert len(batches) == case_steps(skewed, 4) == 4  # 4 of case 0 + 12 others fill 4 batches of 4, not 5
    assert all(len({skewed[p] for p in b}) == 4 for b in batches)


def test_multi_slide_cases_train_below_the_self_negative_floor(
    cohort: dict[str, Path], case_run: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 cases x 3 near-identical slides, one report each. Plain shuffled batches (every row its own case, as
    before cases were known) never go below their self-negative floor; case batches fall far below it, and
    validation R@1 by the row's exact slide is 0 by construction while by case it finds the slides."""
    logged = case_run
    first = logged[0]
    assert first["cases/train"] == N_TRAIN and first["pairs/train"] == N_TRAIN * SLIDES_PER_CASE
    assert "case" in first["definitions"]["val/report_to_slide/R@K"]
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    assert len(losses) == EPOCHS * SLIDES_PER_CASE  # batch lowered to the 8 cases: every slide, every epoch
    val = [r for r in logged if "val/report_to_slide/R@1" in r]
    assert max(r["val/report_to_slide/R@1"] for r in val) >= 0.5
    assert max(r["val/slide_to_report/R@1"] for r in val) >= 0.5

    monkeypatch.setattr(Pairs, "cases", lambda self: list(range(len(self))))
    plain = run(cohort["root"], "plain", cohort["pairs"], cohort["embeddings"], batch_size=N_TRAIN)
    steps = [r for r in plain if "train/loss" in r]
    floors = [self_negative_floor(r["epoch"], (r["step"] - 1) % SLIDES_PER_CASE, N_TRAIN) for r in steps]
    assert all(r["train/loss"] >= floor - 1e-3 for r, floor in zip(steps, floors, strict=True))
    last = slice(-2 * SLIDES_PER_CASE, None)  # the last two epochs
    assert np.mean(losses[last]) < np.mean(floors[last]) / 10, (losses[last], floors[last])
    # the validation cases' 3 slides are identical: two equal slides always rank above the row's own
    assert all(r["val/report_to_slide/R@1"] == 0.0 for r in plain if "val/report_to_slide/R@1" in r)


def test_retrieval_recalls_by_case() -> None:
    slide = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), dim=-1)
    text = slide.clone()
    cases = [0, 0, 1, 1]
    assert retrieval_recalls(slide, text, ks=(1,))["report_to_slide/R@1"] == 0.0  # the 0.000
    by_case = retrieval_recalls(slide, text, ks=(1,), cases=cases)
    assert by_case["report_to_slide/R@1"] == by_case["slide_to_report/R@1"] == 1.0
    # without shared cases the numbers are exactly those of the slide-level metric
    rng = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 4, generator=rng), torch.randn(8, 4, generator=rng)
    assert retrieval_recalls(s, t, cases=list(range(8))) == retrieval_recalls(s, t)


def test_eval_retrieval_counts_the_case(
    cohort: dict[str, Path], case_run: list[dict], capsys: pytest.CaptureFixture[str]
) -> None:
    """`vlm eval retrieval` on the validation cases (3 identical slides each): by the row's own slide R@1 would
    be 0 (two equal slides rank above it); by case, the trained model finds the case's slides."""
    out = cohort["root"] / "eval.json"
    argv = ["eval", "retrieval", "--model", str(cohort["root"] / "cases" / "model"),
            "--pairs", str(cohort["pairs"]), "--embeddings", str(cohort["embeddings"]),
            "--split", "val", "--n-boot", "50", "--out", str(out)]
    assert cli_main(argv) == 0
    assert "12 pairs, 12 slides, 4 cases" in capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert metrics["n_cases"] == 4 and "own case" in metrics["definitions"]["report_to_slide"]
    best = max((r for r in case_run if "val/mean_recall" in r), key=lambda r: r["val/mean_recall"])
    # model/ is the best validation epoch's model, on the same pairs: the same case-level figures
    assert best["val/report_to_slide/R@1"] >= 0.5
    for key in ("report_to_slide/R@1", "slide_to_report/R@1", "report_to_slide/R@5"):
        direction, k = key.split("/")
        assert metrics[direction][k]["value"] == pytest.approx(best[f"val/{key}"]), key


def test_one_slide_cases_train_exactly_as_plain_shuffling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Distinct patients, reports and slides: every row its own case, and the batches are those of plain
    shuffling (`randperm` of the training rows per epoch, cut into full batches), as before cases existed."""
    from tests.support.synthetic import write_synthetic
    from vlm.formats.pairs import load_pairs
    from vlm.training import loop

    pairs, embeddings = write_synthetic(tmp_path)
    build_tiny_text_encoder(tmp_path / "text", dropout=0.0)
    seen: list[list[int]] = []
    original = loop._train_step

    def recording(model, inputs, rows, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(list(rows))
        return original(model, inputs, rows, *args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", recording)
    run(tmp_path, "plain", pairs, embeddings, epochs=2, batch_size=12, seed=3)
    train_rows = load_pairs(pairs).indices("train")
    expected = []
    for epoch in range(2):
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(3 * 100_003 + epoch)).tolist()
        expected += [[train_rows[i] for i in order[s * 12 : (s + 1) * 12]] for s in range(len(train_rows) // 12)]
    assert seen == expected


def test_zeroshot_case_level_is_the_softmax_of_mean_logits(
    cohort: dict[str, Path], case_run: list[dict], tmp_path: Path
) -> None:
    """`vlm zeroshot --level case` with the cohort's trained model: its logits are far apart, so the mean of
    logits and the mean of probabilities differ clearly, and the case rows must be the former."""
    slides = pd.read_parquet(cohort["embeddings"])["slide_id"].tolist()[: N_TRAIN * SLIDES_PER_CASE]
    labels = tmp_path / "labels.csv"  # cases of the zero-shot labels: 3 slides of different training cases each
    pd.DataFrame({"slide_id": slides, "patient_id": [f"P{i % 8}" for i in range(len(slides))],
                  "label": ["a" if i % 8 < 4 else "b" for i in range(len(slides))]}).to_csv(labels, index=False)
    slide_table = tmp_path / "slides.parquet"
    pd.read_parquet(cohort["embeddings"]).iloc[: len(slides)].to_parquet(slide_table)
    common = ["zeroshot", "--model", str(cohort["root"] / "cases" / "model"), "--embeddings", str(slide_table),
              "--classes", f"a={GRADES[0]} grade {DIAGNOSES[0]}", f"b={GRADES[5]} grade {DIAGNOSES[1]}",
              "--labels", str(labels), "--n-boot", "20", "--no-cache"]
    assert cli_main([*common, "--out", str(tmp_path / "slide")]) == 0
    assert cli_main([*common, "--out", str(tmp_path / "case"), "--level", "case"]) == 0
    per_slide = pd.read_csv(tmp_path / "slide" / "predictions.csv").set_index("slide_id")
    per_case = pd.read_csv(tmp_path / "case" / "predictions.csv")
    assert len(per_case) == 8 and json.loads((tmp_path / "case" / "metrics.json").read_text())["n"] == 8
    for _, row in per_case.iterrows():
        p = per_slide.loc[row["slide_ids"].split(";"), ["a", "b"]].to_numpy()
        log_mean = np.log(p).mean(axis=0)  # softmax is shift-invariant: mean log p ~ mean logits
        expected = np.exp(log_mean) / np.exp(log_mean).sum()
        np.testing.assert_allclose(row[["a", "b"]].to_numpy(float), expected, atol=1e-4)
    mean_of_probabilities = np.stack(
        [per_slide.loc[ids.split(";"), ["a", "b"]].to_numpy().mean(axis=0) for ids in per_case["slide_ids"]]
    )
    assert np.abs(per_case[["a", "b"]].to_numpy() - mean_of_probabilities).max() > 1e-2  # the test can tell

"""Training: splits, input checks, a tiny end-to-end run, GradCache exactness, resume determinism."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.support.models import build_tiny_model, build_tiny_text_encoder
from tests.support.synthetic import DIAGNOSES, DIM, GRADES, write_synthetic
from vlm.cli import main as cli_main
from vlm.encoders.text import load_text_encoder
from vlm.formats.pairs import Pairs, load_pairs
from vlm.model import SlideTextModel
from vlm.model.loss import contrastive_loss, create_loss
from vlm.training import loop
from vlm.training.config import CONFIG_FILE, TrainConfig
from vlm.training.data import assign_splits
from vlm.training.gradcache import contrastive_backward
from vlm.training.loop import train
from vlm.training.pair_inputs import Inputs, prepare_pairs


@pytest.fixture(scope="module", autouse=True)
def _token_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The report-token cache of these runs goes to a temporary folder, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLM_CACHE", str(tmp_path_factory.mktemp("vlm-cache")))
        yield



@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    pairs, embeddings = write_synthetic(root, test_rows=4)
    return {"root": root, "pairs": pairs, "embeddings": embeddings, "text": build_tiny_text_encoder(root / "text")}


def config(data: dict[str, Path], out: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = dict(
        pairs=str(data["pairs"]), out=str(out), embeddings=str(data["embeddings"]),
        text_encoder=str(data["text"]), max_length=16, proj_dim=16, epochs=2, batch_size=12, lr=2e-3,
    )
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


def records(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_train_end_to_end_learns(data: dict[str, Path]) -> None:
    out = data["root"] / "cli-run"
    argv = ["train", "--pairs", str(data["pairs"]), "--embeddings", str(data["embeddings"]), "--out", str(out),
            "--text-encoder", str(data["text"]), "--max-length", "16", "--proj-dim", "16", "--epochs", "12",
            "--batch-size", "12", "--lr", "2e-3", "--seed", "0"]
    assert cli_main(argv) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "model").iterdir()}
    logged = records(out)
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    val = [r for r in logged if "val/report_to_slide/R@1" in r]
    assert len(val) == 12 and all(math.isfinite(x) for x in losses)  # NaN test rows were never trained on
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    chance = 1 / 12  # 12 validation pairs
    best = max(val, key=lambda r: r["val/mean_recall"])
    assert best["val/slide_to_report/R@1"] > 2 * chance or best["val/report_to_slide/R@1"] > 2 * chance
    assert set(pd.read_csv(out / "splits.csv")["split"]) == {"train", "val", "test"}
    assert json.loads((out / "train_config.json").read_text())["epochs"] == 12
    assert logged[0] == {"step": 0, "pairs/train": 36, "pairs/val": 12, "pairs/test": 4, "cases/train": 36,
                         "cases/val": 12, "cases/test": 1,  # the 4 test rows share one report text
                         "truncated_reports": 1, "max_length": 16, "definitions": loop.METRIC_DEFINITIONS}
    model = SlideTextModel.from_pretrained(out / "model")  # `model/` is the best epoch's model
    slides = pd.read_parquet(data["embeddings"]).iloc[[0, 4, 8]]
    emb = model.encode_slide_embeddings(torch.tensor(np.stack(slides["embedding"].to_list()), dtype=torch.float32))
    text = model.encode_text(pd.read_csv(data["pairs"])["report"].iloc[[0, 4, 8]].to_list())
    assert emb.shape == text.shape == (3, 16)


@pytest.mark.slow
def test_resume_gives_the_same_next_losses(data: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    reference = data["root"] / "uninterrupted"
    result = train(config(data, reference, checkpoint_every=4))
    crashed = data["root"] / "crashed"
    calls = {"n": 0}
    original = loop._train_step

    def crash_on_step_6(*args: object, **kwargs: object) -> dict[str, float]:
        # 3 steps per epoch; checkpoints after step 3 (epoch end) and 4 (mid-epoch); step 5 is logged but lost
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", crash_on_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(config(data, crashed, checkpoint_every=4))
    monkeypatch.setattr(loop, "_train_step", original)
    assert [r["step"] for r in records(crashed)] == [0, 1, 2, 3, 3, 4, 5]
    with pytest.raises(ValueError, match="`resume`"):
        train(config(data, crashed, checkpoint_every=4))
    resumed = train(TrainConfig.load(crashed / CONFIG_FILE), resume=True)
    ours, theirs = records(crashed), records(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for mine, ref in zip(ours, theirs, strict=True):
        for key in ("train/loss", "val/loss", "val/mean_recall"):
            if key in ref:
                assert mine[key] == pytest.approx(ref[key], abs=1e-6), (mine["step"], key)
    # the returned TrainResult says what metrics.jsonl says, whether the run was resumed or not: `model/` holds
    # the first epoch of the best val/mean_recall, and `metrics` is the last epoch's record
    val = [r for r in theirs if "val/mean_recall" in r]
    assert result.best_epoch == max(val, key=lambda r: r["val/mean_recall"])["epoch"]
    assert result.metrics == val[-1] and result.metrics["epoch"] == 1 and "val/mean_recall" in result.metrics
    assert Path(result) == reference / "model" and os.fspath(resumed) == str(crashed / "model") == str(resumed)
    assert resumed.best_epoch == result.best_epoch
    assert resumed.metrics == pytest.approx(result.metrics, abs=1e-6)
    again = train(TrainConfig.load(crashed / CONFIG_FILE), resume=True)  # nothing left to run: read back from the run
    assert again.best_epoch == resumed.best_epoch and again.metrics == resumed.metrics


def test_a_run_saved_with_the_old_field_name_still_resumes(data: dict[str, Path]) -> None:
    """Runs saved before `slide_embeddings` became `embeddings` (train_config.json and the checkpoint's copy)
    resume with `vlm train --resume`; the file is rewritten under the new name."""
    run = data["root"] / "old-run"
    train(config(data, run, epochs=1))
    saved = json.loads((run / CONFIG_FILE).read_text())
    saved = {("slide_embeddings" if key == "embeddings" else key): value for key, value in saved.items()}
    (run / CONFIG_FILE).write_text(json.dumps(saved, indent=2) + "\n")  # as vlm 0.1 wrote it
    assert cli_main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert [r["step"] for r in records(run) if "lr" in r] == [1, 2, 3, 4, 5, 6]  # 3 steps per epoch, both epochs
    resumed = json.loads((run / CONFIG_FILE).read_text())
    assert resumed["embeddings"] == str(data["embeddings"]) and "slide_embeddings" not in resumed
    assert TrainConfig.load(run / CONFIG_FILE).epochs == 2


@pytest.mark.slow
def test_resume_with_more_epochs_continues_the_schedule_smoothly(data: dict[str, Path]) -> None:
    """`--resume --epochs N` on a finished run: no step at learning rate 0, no jump; the ramp survives a crash."""
    import dataclasses

    run = data["root"] / "extended"
    train(config(data, run, epochs=4, warmup_steps=2))
    train(dataclasses.replace(TrainConfig.load(run / CONFIG_FILE), epochs=8), resume=True)
    lrs = [r["lr"] for r in records(run) if "lr" in r]
    assert len(lrs) == 8 * 3  # 3 steps per epoch
    extension = lrs[12:]
    assert min(extension) > 0, extension
    # a ramp over the 2 warm-up steps from 0 up to the longer plan's cosine, then its smooth decay
    steps = np.abs(np.diff(lrs[11:]))
    assert steps.max() <= 2e-3 / 2 + 1e-9, lrs
    assert extension[1] == pytest.approx(max(extension)) and extension[-1] < extension[1] / 5
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["lr_extend_from"][0] == 12  # a later resume of the extended run keeps its ramp
    # ... and its length: a crash in the extension, then `--resume` alone, used to read 4 epochs back and stop
    assert TrainConfig.load(run / CONFIG_FILE).epochs == 8


def test_siglip_loss_trains(data: dict[str, Path]) -> None:
    out = data["root"] / "siglip"
    train(config(data, out, loss="siglip", epochs=1))
    model = SlideTextModel.from_pretrained(out / "model")
    assert model.logit_bias is not None and model.logit_scale.item() == pytest.approx(math.log(10), abs=0.1)


def test_gradcache_gradient_equals_full_batch(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path, slide_embed_dim=DIM, proj_dim=8).eval()  # eval: no dropout to replay
    embeddings = torch.randn(7, DIM)
    texts = [f"{g} grade {d}" for g, d in zip(GRADES + GRADES, DIAGNOSES[:7], strict=False)]
    loss_fn = create_loss("clip")

    def gradients(chunk: int | None) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = contrastive_backward(
            lambda rows: model.encode_slide_embeddings(embeddings[list(rows)]),
            lambda rows: model.encode_tokens(model.text.tokenize([texts[i] for i in rows])),
            len(texts),
            lambda s, t: contrastive_loss(loss_fn, s, t, model.scale()),
            chunk_size=chunk,
        )
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full_loss, full = gradients(None)
    cached_loss, cached = gradients(3)
    assert cached_loss == pytest.approx(full_loss, abs=1e-6)
    assert full.keys() == cached.keys() and len(full) > 10
    for name in full:
        torch.testing.assert_close(cached[name], full[name], atol=1e-5, rtol=1e-4, msg=name)


def test_patient_level_splits_never_leak() -> None:
    rng = np.random.default_rng(1)
    patients = [f"p{int(i)}" for i in rng.integers(0, 40, size=300)]
    pairs = Pairs([f"s{i}" for i in range(300)], ["r"] * 300, patients)
    split = assign_splits(pairs, val_fraction=0.2, test_fraction=0.2, seed=3)
    by_patient: dict[str, set[str]] = {}
    for patient, s in zip(patients, split.splits or [], strict=True):
        by_patient.setdefault(patient, set()).add(s)
    assert all(len(s) == 1 for s in by_patient.values())
    assert {"train", "val", "test"} == {s for v in by_patient.values() for s in v}


def test_given_split_that_leaks_a_patient_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [{"slide_id": "a", "report": "x", "patient_id": "p1", "split": "train"},
            {"slide_id": "b", "report": "y", "patient_id": "p1", "split": "test"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="more than one split.*p1"):
        load_pairs(path)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"slide": "a", "report": "x"}], r"missing column\(s\) \['slide_id'\]"),
        ([{"slide_id": "a", "report": "x", "split": "training"}], r"unknown split value\(s\) \['training'\]"),
        ([{"slide_id": "a", "report": ""}], r"empty 'report'"),
    ],
)
def test_bad_pairs_files_give_clear_errors(tmp_path: Path, rows: list[dict[str, str]], message: str) -> None:
    path = tmp_path / "pairs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(ValueError, match=message):
        load_pairs(path)


def test_slides_missing_from_embeddings_are_listed(data: dict[str, Path], tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    frame = pd.read_csv(data["pairs"])
    pd.concat(
        [frame, pd.DataFrame([{"slide_id": "ghost-1", "report": "benign", "patient_id": "g", "split": "train"}])]
    ).to_csv(pairs, index=False)
    with pytest.raises(ValueError, match=r"1 slide id\(s\).*ghost-1.*`drop_missing`"):
        train(config(data, tmp_path / "run", pairs=str(pairs)))
    assert cli_main(["train", "--pairs", str(pairs), "--out", str(tmp_path / "r")]) == 2  # no slide input given


def write_tiny_features(root: Path, n_slides: int = 12, in_dim: int = 32) -> tuple[Path, Path]:
    """Feature files for the "tiny" slide encoder preset: 5–20 tiles a slide, features tied to a class word."""
    from vlm.formats.features import TileFeatures, TileGrid, write_features

    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(len(DIAGNOSES), in_dim))
    folder, rows = root / "features", []
    for i in range(n_slides):
        n = int(rng.integers(5, 20))
        coords = np.stack([rng.integers(0, 20, n) * 512, rng.integers(0, 20, n) * 512], axis=1)  # 0.25 mpp scan
        grid = TileGrid(coords=coords, mpp=0.25, tile_size=256, target_mpp=0.5, tile_size_level0=512)
        feats = prototypes[i % len(DIAGNOSES)] + 0.1 * rng.normal(size=(n, in_dim))
        write_features(folder / f"s{i}.h5", TileFeatures(grid, feats.astype(np.float32), encoder="synthetic"))
        rows.append({"slide_id": f"s{i}", "report": f"the slide shows {DIAGNOSES[i % len(DIAGNOSES)]}"})
    pd.DataFrame(rows).to_csv(root / "pairs_full.csv", index=False)
    return root / "pairs_full.csv", folder


@pytest.mark.slow
def test_full_fine_tuning_with_gradcache(data: dict[str, Path]) -> None:
    pytest.importorskip("vlm.encoders.slide")
    pairs, features = write_tiny_features(data["root"], n_slides=8)
    out = data["root"] / "full"
    train(config(data, out, pairs=str(pairs), embeddings=None, features=str(features), slide_encoder="tiny",
                 batch_size=3, chunk_size=2, epochs=1, val_fraction=0.25, max_tiles=8))
    model = SlideTextModel.from_pretrained(out / "model")
    assert model.slide_encoder is not None and model.config.slide_encoder == "tiny"
    logged = records(out)
    assert all(math.isfinite(r["train/loss"]) for r in logged if "train/loss" in r)
    assert "val/report_to_slide/R@1" in logged[-1]


@pytest.mark.slow
def test_gradcache_through_slide_encoder(tmp_path: Path) -> None:
    pytest.importorskip("vlm.encoders.slide")
    from vlm.training.data import load_slide_features

    pairs, features = write_tiny_features(tmp_path, n_slides=4)
    model = build_tiny_model(tmp_path, slide_encoder="tiny", proj_dim=8).eval()
    ids, texts = [f"s{i}" for i in range(4)], pd.read_csv(pairs)["report"].to_list()
    loss_fn = create_loss("clip")

    def encode_slides(rows: range) -> torch.Tensor:
        return model.encode_slides(*load_slide_features(features, [ids[i] for i in rows]))

    def gradients(chunk: int | None) -> dict[str, torch.Tensor]:
        model.zero_grad()
        contrastive_backward(
            encode_slides,
            lambda rows: model.encode_tokens(model.text.tokenize([texts[i] for i in rows])),
            4,
            lambda s, t: contrastive_loss(loss_fn, s, t, model.scale()),
            chunk_size=chunk,
        )
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, cached = gradients(None), gradients(2)
    assert any(n.startswith("slide_encoder.") for n in full)
    for name in full:
        torch.testing.assert_close(cached[name], full[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(data: dict[str, Path], tmp_path: Path) -> None:
    """DDP on CPU (gloo): 2 ranks × 6 pairs with features gathered across ranks = 1 process × 12 pairs."""
    import subprocess
    import sys

    text = build_tiny_text_encoder(tmp_path / "text", dropout=0.0)  # no dropout: ranks draw different masks
    train(config(data, tmp_path / "single", text_encoder=str(text), epochs=1))
    argv = ["--pairs", str(data["pairs"]), "--embeddings", str(data["embeddings"]),
            "--out", str(tmp_path / "ddp"), "--text-encoder", str(text), "--max-length", "16",
            "--proj-dim", "16", "--epochs", "1", "--batch-size", "12", "--lr", "2e-3"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vlm", "train", *argv]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = records(tmp_path / "single"), records(tmp_path / "ddp")
    losses = [(a["train/loss"], b["train/loss"]) for a, b in zip(single, ddp, strict=True) if "train/loss" in a]
    assert len(losses) == 3
    for one, two in losses:
        assert two == pytest.approx(one, abs=1e-5)


def test_unfreeze_text_last_trains_only_those_layers(data: dict[str, Path]) -> None:
    out = data["root"] / "partly-frozen"
    train(config(data, out, epochs=1, unfreeze_text_last=1))
    trained = dict(SlideTextModel.from_pretrained(out / "last").text.model.named_parameters())
    initial = dict(load_text_encoder(data["text"]).model.named_parameters())
    changed = {n for n, p in trained.items() if not torch.equal(p, initial[n])}
    assert changed and all(".layer.1." in n for n in changed)


def test_frozen_text_tower_runs_once_and_matches_eval_mode(data: dict[str, Path]) -> None:
    cfg = config(data, data["root"] / "frozen-text", freeze_text=True)
    model = build_tiny_model(data["root"] / "frozen-model", slide_embed_dim=DIM, proj_dim=16)
    loop.apply_freezing(model, cfg)
    inputs = Inputs(cfg, prepare_pairs(cfg), torch.device("cpu"))
    model.train()
    calls = []
    model.text.register_forward_hook(lambda *_: calls.append(1))
    rows = [0, 3, 5]
    cached = inputs.encode_texts(model, rows)
    inputs.encode_texts(model, [1, 2])
    assert len(calls) == 1  # every report encoded in one pass, then reused
    model.eval()
    with torch.no_grad():
        direct = model.encode_tokens(model.text.tokenize([inputs.pairs.reports[i] for i in rows]))
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-5)
    assert cached.requires_grad  # the projection head still trains on the cached features


def test_csv_ids_stay_text(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("slide_id,report,patient_id\n001,benign,07\n002,carcinoma,08\n")
    pairs = load_pairs(path)
    assert pairs.slide_ids == ["001", "002"] and pairs.patient_ids == ["07", "08"]


def test_prefetching_loader_matches_direct_reads(tmp_path: Path) -> None:
    pytest.importorskip("vlm.encoders.slide")
    from vlm.training.data import PrefetchingFeatureLoader, load_slide_features

    _, features = write_tiny_features(tmp_path, n_slides=4)
    loader = PrefetchingFeatureLoader(features)
    calls = [(["s0", "s1"], 6, 1), (["s2", "s3"], 6, 1), (["s0", "s1"], 6, 1)]
    loader.plan(calls)
    for ids, max_tiles, seed in [*calls, (["s3"], None, 0)]:  # the last call is off-plan: read directly
        direct = load_slide_features(features, ids, max_tiles, seed)
        for got, expected in zip(loader.load(ids, max_tiles, seed), direct, strict=True):
            assert torch.equal(got, expected)


class _CountingTokenizer:
    """A real tokenizer that counts its tokenising calls (everything else is passed through)."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self.tokenizer, name)


def test_reports_are_tokenised_once_across_runs(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`datasets` earns its place: the report corpus is tokenised by `Dataset.map` into an on-disk cache that a
    re-run or a resumed run reads back instead of tokenising again."""
    import logging

    from vlm.training.data import ReportTokens

    text = load_text_encoder(data["text"], max_length=8)
    reports = load_pairs(data["pairs"]).reports
    spy = _CountingTokenizer(text.tokenizer)
    first = ReportTokens(reports, spy, 8, cache_dir=tmp_path)
    assert spy.calls > 0 and not first.cached
    spy.calls = 0
    again = ReportTokens(reports, spy, 8, cache_dir=tmp_path)
    assert spy.calls == 0 and again.cached  # read back, not tokenised
    rows = [1, 0, 7]  # row 1 is the long report: truncated to 8 tokens, the others padded to it
    expected = text.tokenize([reports[i] for i in rows])
    got = again.batch(rows)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert again.count_truncated(range(len(reports))) == text.count_truncated(reports)
    assert not ReportTokens(reports[:-1], spy, 8, cache_dir=tmp_path).cached  # other reports: another file
    assert not ReportTokens(reports, spy, 9, cache_dir=tmp_path).cached  # another max_length: another file

    monkeypatch.setenv("VLM_CACHE", str(tmp_path / "cache"))
    train(config(data, tmp_path / "one", epochs=1))
    with caplog.at_level(logging.INFO, logger="vlm.training.data"):
        train(config(data, tmp_path / "two", epochs=1))
    assert "reports' tokens read from" in caplog.text


def test_train_on_features_of_mixed_tile_encoders_is_refused_before_training(data: dict[str, Path]) -> None:
    """`train --features` ran on a folder mixing tile encoders of the same width (the pre-flight checked widths)."""
    import h5py

    pairs, features = write_tiny_features(data["root"] / "mixed", n_slides=4)
    with h5py.File(features / "s2.h5", "r+") as h5:
        h5.attrs["encoder"] = "timm:resnet18"
    out = data["root"] / "mixed-run"
    with pytest.raises(ValueError, match=r"mix tile encoders: 3 record 'synthetic', but s2.h5 \('timm:resnet18'\)"):
        train(config(data, out, pairs=str(pairs), embeddings=None, features=str(features), slide_encoder="tiny"))
    assert not out.exists()

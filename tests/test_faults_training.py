"""Fault campaign, training, tables and library errors: damaged, hostile or interrupted inputs, one clear error.

Each test injects one fault the way it happens in practice (a kill mid-write, a crafted file, a NaN row, a
spreadsheet export) and checks that nothing wrong is written and nothing foreign is run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.support.models import build_tiny_text_encoder
from vlm.cli import main as cli_main
from vlm.training.checkpoint import CHECKPOINT
from vlm.training.config import CONFIG_FILE, TrainConfig
from vlm.training.loop import train

# --- training ---------------------------------------------------------------------------------------------

DIM = 8


@pytest.fixture(scope="module", autouse=True)
def _token_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The report-token cache of these runs goes to a temporary folder, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLM_CACHE", str(tmp_path_factory.mktemp("vlm-cache")))
        yield


def _write_pairs(root: Path, embeddings: np.ndarray) -> tuple[Path, Path]:
    """Pairs "report k" <-> slide k (k < 16, 12 train + 4 val) with the given [16, DIM] slide embeddings."""
    rows = [
        {"slide_id": f"s{k}", "report": f"report {k}", "split": "val" if k % 4 == 0 else "train"} for k in range(16)
    ]
    pairs, slides = root / "pairs.csv", root / "slides.parquet"
    pd.DataFrame(rows).to_csv(pairs, index=False)
    frame = pd.DataFrame({"slide_id": [r["slide_id"] for r in rows], "embedding": [list(map(float, e)) for e in
                          embeddings], "n_tiles": 10, "encoder": "tiny", "pool": "mean"})
    frame.to_parquet(slides)
    return pairs, slides


def _config(root: Path, out: Path, vectors: np.ndarray | None = None, **overrides: object) -> TrainConfig:
    if vectors is None:
        vectors = np.random.default_rng(0).normal(size=(16, DIM))
    root.mkdir(parents=True, exist_ok=True)
    pairs, slides = _write_pairs(root, vectors)
    text = root / "text"
    if not text.exists():
        build_tiny_text_encoder(text)
    values: dict[str, object] = dict(
        pairs=str(pairs),
        out=str(out),
        embeddings=str(slides),
        text_encoder=str(text),
        max_length=8,
        proj_dim=8,
        epochs=1,
        batch_size=4,
    )
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete 1-epoch run (3 steps, checkpoint at the end); tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("faults-train")
    out = root / "run"
    train(_config(root / "data", out))
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _resume(run: Path) -> Path:
    """`train --resume` on a copied run folder (its config still names the original folder)."""
    return train(dataclasses.replace(TrainConfig.load(run / CONFIG_FILE), out=str(run)), resume=True)


class _WritesMarker:
    """Unpickling this object calls open(marker, "w"): what a crafted checkpoint would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_crafted_checkpoint_is_refused_and_runs_nothing(finished_run: Path, tmp_path: Path) -> None:
    """`--resume` used to unpickle `checkpoints/last.pt` with weights_only=False: any code in it ran."""
    run = _copy(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"model": _WritesMarker(marker), "optimizer": {}, "rng": {}, "global_step": 0}, run / CHECKPOINT)
    assert cli_main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert not marker.exists()
    expected = r"last\.pt: refused: not a readable vlm training checkpoint.*without --resume"
    with pytest.raises(ValueError, match=expected):
        _resume(run)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["crafted", "truncated", "cut-at-5000"])
def test_damaged_slide_encoder_checkpoint_names_the_file(tmp_path: Path, damage: str) -> None:
    """`--slide-checkpoint` gave torch's UnpicklingError / zip-reader traceback without the file's name."""
    from vlm.encoders.slide import create_slide_encoder, load_slide_encoder_weights

    encoder = create_slide_encoder("tiny")
    path, marker = tmp_path / "slide_encoder.pth", tmp_path / "pwned"
    torch.save({"model": encoder.state_dict()}, path)
    if damage == "crafted":
        torch.save({"model": _WritesMarker(marker)}, path)
    elif damage == "cut-at-5000":  # a few cuts give a bare OSError "[Errno 22] Invalid argument" from torch
        path.write_bytes(path.read_bytes()[:5000])
    else:
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"slide_encoder\.pth: refused: not a readable slide-encoder checkpoint"):
        load_slide_encoder_weights(encoder, path)
    assert not marker.exists()


def test_checkpoint_holds_no_pickled_objects(finished_run: Path) -> None:
    """The project's own checkpoint loads with weights_only=True (RNG states stored as tensors and lists)."""
    state = torch.load(finished_run / CHECKPOINT, weights_only=True)
    assert state["global_step"] == 3 and isinstance(state["rng"]["numpy"][1], torch.Tensor)


def test_torn_last_metrics_line_is_dropped_on_resume(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A kill while appending to metrics.jsonl leaves half a line; --resume used to die on json.loads."""
    run = _copy(finished_run, tmp_path)
    log = run / "metrics.jsonl"
    kept = log.read_text()
    log.write_text(kept + '{"step": 4, "epoch": 1, "train/lo')
    with caplog.at_level(logging.WARNING):
        _resume(run)
    assert log.read_text() == kept
    assert "unfinished last line" in caplog.text
    log.write_text('{"step": 0\n' + kept)  # damage in the middle is not an interruption: named, not dropped
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 1 is not a metrics record"):
        _resume(run)


def test_orphan_part_files_are_removed_on_the_next_run(finished_run: Path, tmp_path: Path) -> None:
    """A kill during a checkpoint or model write leaves `.last.pt.*.part` (0.2 GB each) that nothing removed."""
    run = _copy(finished_run, tmp_path)
    orphans = [run / "checkpoints" / ".last.pt.k2j3.part", run / ".metrics.jsonl.x9.part"]
    for orphan in orphans:
        orphan.write_bytes(b"\0" * 1000)
    staging = run / "model" / ".vlm-staging-abc"  # a kill while `model/` was being written
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"\0" * 1000)
    _resume(run)
    assert not [p.name for p in run.rglob("*.part")]
    assert not staging.exists()
    assert (run / "model" / "model.safetensors").is_file()  # finished outputs untouched


def test_nan_slide_embedding_is_refused_by_id(tmp_path: Path) -> None:
    """A NaN row used to train a NaN model that was saved as `model/` (NaN recall counted as 1.0)."""
    embeddings = np.random.default_rng(0).normal(size=(16, DIM))
    embeddings[5, 3] = np.nan
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"slides\.parquet: 1 slide\(s\) have NaN or infinite .*\['s5'\]"):
        train(_config(tmp_path / "data", out, embeddings))
    assert not (out / "model").exists()


def test_non_finite_loss_stops_training_and_saves_nothing(tmp_path: Path) -> None:
    """A diverging run (lr 1e30: the first step throws the weights far out) used to go on and save NaNs."""
    out = tmp_path / "run"
    config = _config(tmp_path / "data", out, lr=1e30, warmup_steps=0)
    with pytest.raises(FloatingPointError, match=r"epoch 0, step [23]: non-finite training loss .*'s"):
        train(config)
    assert not (out / "model").exists() and not (out / CHECKPOINT).exists()
    shutil.rmtree(out)
    argv = ["train", "--pairs", config.pairs, "--embeddings", str(config.embeddings), "--out", str(out),
            "--text-encoder", config.text_encoder, "--max-length", "8", "--proj-dim", "8", "--epochs", "1",
            "--batch-size", "4", "--lr", "1e30", "--warmup-steps", "0", "--no-progress"]
    assert cli_main(argv) == 1
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 0  # only the header line


def _write_feature_files(folder: Path, n: int = 8) -> Path:
    """Feature files as `vlm embed-tiles` writes them (`write_features`), for the "tiny" encoder."""
    from vlm.formats.features import TileFeatures, TileGrid, write_features

    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        coords = np.stack([np.arange(6) * 512, np.full(6, k * 512)], axis=1)  # 6 tiles of 256 px at 0.5 mpp
        grid = TileGrid(coords=coords, mpp=0.25, tile_size=256, target_mpp=0.5, tile_size_level0=512)
        write_features(folder / f"s{k}.h5", TileFeatures(grid, rng.normal(size=(6, 32)).astype(np.float32), "x"))
        rows.append({"slide_id": f"s{k}", "report": f"report {k}", "split": "val" if k % 4 == 0 else "train"})
    pd.DataFrame(rows).to_csv(folder.parent / "pairs.csv", index=False)
    return folder.parent / "pairs.csv"


def test_bad_feature_files_are_all_listed_before_training(tmp_path: Path) -> None:
    """`train --features` used to stop at the first bad file, mid-run, naming only that one."""
    import h5py

    features = tmp_path / "features"
    pairs = _write_feature_files(features)
    with h5py.File(features / "s3.h5", "a") as h5:
        del h5.attrs["mpp"]  # a file that cannot be placed on a physical scale
    (features / "s6.h5").write_bytes((features / "s6.h5").read_bytes()[:300])  # a copy cut short
    out = tmp_path / "run"
    config = _config(tmp_path / "data", out, pairs=str(pairs), embeddings=None, features=str(features),
                     slide_encoder="tiny", batch_size=2)
    expected = r"2 feature file\(s\).*\n  s3: .*'mpp'.*\n  s6: .*not a readable HDF5[^\n]*\n.*`drop_missing`"
    with pytest.raises(ValueError, match=expected):
        train(config)
    assert not out.exists()  # refused before anything was written
    train(dataclasses.replace(config, drop_missing=True))
    splits = pd.read_csv(out / "splits.csv", dtype=str)
    assert sorted(splits["slide_id"]) == ["s0", "s1", "s2", "s4", "s5", "s7"]


def test_nan_tile_features_are_refused_by_slide(tmp_path: Path) -> None:
    """One NaN tile stopped training with "features contain NaN or inf", naming neither the slide nor the file.

    (The slide inputs' one loader, `vlm.encoders.slide_inputs`, now names both; this holds it for training.)"""
    import h5py

    features = tmp_path / "features"
    pairs = _write_feature_files(features)
    with h5py.File(features / "s2.h5", "a") as h5:
        h5["features"][3, 5] = np.nan
    config = _config(tmp_path / "data", tmp_path / "run", pairs=str(pairs), embeddings=None,
                     features=str(features), slide_encoder="tiny", batch_size=6)
    with pytest.raises(ValueError, match=r"slide 's2' \(.*s2\.h5\): 1 of 6 tiles have NaN/inf features"):
        train(config)
    assert not (tmp_path / "run" / "model").exists()


# --- library errors at the command line -------------------------------------------------------------------


def _damaged_model(tmp_path: Path) -> Path:
    from tests.support.models import build_tiny_model

    folder = tmp_path / "model"
    build_tiny_model(tmp_path / "text", slide_embed_dim=DIM, proj_dim=8).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])  # header length field flipped
    return folder


@pytest.mark.parametrize("verbose", [False, True])
def test_damaged_safetensors_is_one_line_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, verbose: bool
) -> None:
    """A flipped byte in model.safetensors used to reach the user as a SafetensorError traceback."""
    model = _damaged_model(tmp_path)
    argv = ["eval", "retrieval", "--model", str(model), "--pairs", "p.csv", "--embeddings", "s.parquet"]
    with caplog.at_level(logging.ERROR):
        assert cli_main(["-v", *argv] if verbose else argv) == 2
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "model.safetensors: not a readable safetensors file" in record.getMessage()
    assert bool(record.exc_info) == verbose  # -v shows the traceback, otherwise one line


def test_library_errors_are_told_from_bugs(tmp_path: Path) -> None:
    """A damaged index is an input error named by its reader; a RuntimeError of vlm's own code is a bug."""
    import pickle

    import faiss

    from vlm.cli import _is_library_error

    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    path = tmp_path / "index.faiss"
    faiss.write_index(index, str(path))
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(RuntimeError) as faiss_error:
        faiss.read_index(str(path))
    assert not _is_library_error(faiss_error.value)  # no traceback sniffing: the reader names the file
    assert _is_library_error(pickle.UnpicklingError("bad"))
    with pytest.raises(RuntimeError) as bug:
        torch.zeros(2) @ torch.zeros(3)  # a shape bug inside vlm's own code path is not an input error
    assert not _is_library_error(bug.value) and not _is_library_error(KeyError("x"))


# --- outputs ----------------------------------------------------------------------------------------------

USER_FILE = b"slide_id,prediction\nmine,1\n"


def _users_folder(tmp_path: Path) -> Path:
    """A folder of the user's own files, one named like a vlm output (predictions.csv)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "predictions.csv").write_bytes(USER_FILE)
    return folder


def _argv(command: str, root: Path, out: Path) -> list[str]:
    """The command's argv with inputs that do not exist: the --out refusal must come before they are read."""
    absent = str(root / "absent")
    return {
        "zeroshot": ["zeroshot", "--model", absent, "--embeddings", absent, "--classes", "A=a", "B=b",
                     "--out", str(out)],
        "probe": ["probe", "--embeddings", absent, "--labels", absent, "--test-labels", absent, "--out", str(out)],
        "heatmap": ["heatmap", "--model", absent, "--features", absent, "--query", "q", "--out", str(out)],
        "zeroshot --heatmaps": ["zeroshot", "--model", absent, "--features", str(root), "--classes", "A=a", "B=b",
                                "--out", str(root / "zs"), "--heatmaps", str(out)],
    }[command]


@pytest.mark.parametrize("command", ["zeroshot", "probe", "heatmap", "zeroshot --heatmaps", "train"])
def test_output_folder_of_the_users_files_is_refused_up_front(
    command: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """These commands used to replace a user's same-named file in --out (index build alone refused)."""
    mine = _users_folder(tmp_path)
    if command == "train":
        config = _config(tmp_path / "data", mine)
        argv = ["train", "--pairs", config.pairs, "--embeddings", str(config.embeddings), "--out",
                str(mine), "--text-encoder", config.text_encoder, "--no-progress"]
    else:
        argv = _argv(command, tmp_path, mine)
    with caplog.at_level(logging.ERROR):
        assert cli_main(argv) == 2
    assert f"{mine}: exists and is not a `vlm" in caplog.text and "(it holds predictions.csv)" in caplog.text
    assert [p.name for p in mine.iterdir()] == ["predictions.csv"]
    assert (mine / "predictions.csv").read_bytes() == USER_FILE
    assert not (tmp_path / "zs").exists()


@pytest.mark.parametrize("command", ["zeroshot", "probe", "heatmap", "zeroshot --heatmaps"])
def test_output_path_that_is_a_file_is_named_before_any_input_is_read(
    command: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "results.csv"
    file.write_bytes(USER_FILE)
    with caplog.at_level(logging.ERROR):
        assert cli_main(_argv(command, tmp_path, file)) == 2
    assert f"{file}: exists and is a file, not a folder" in caplog.text
    assert file.read_bytes() == USER_FILE


def test_train_into_a_run_folder_keeps_its_resume_rules(finished_run: Path, tmp_path: Path) -> None:
    """A run of an earlier vlm (no marker) is still a training run: refused without --resume, resumed with it."""
    from vlm.io import OUTPUT_MARKER

    run = _copy(finished_run, tmp_path)
    (run / OUTPUT_MARKER).unlink()
    config = TrainConfig.load(run / CONFIG_FILE)
    with pytest.raises(ValueError, match="already holds a training run; pass `resume`"):
        train(dataclasses.replace(config, out=str(run)))
    assert (run / OUTPUT_MARKER).read_text() == "train\n"  # recognised as vlm's (and marked), not refused


def test_probe_and_zeroshot_rerun_into_their_own_folder(tmp_path: Path) -> None:
    from tests.support.models import build_tiny_model

    rng = np.random.default_rng(0)
    ids = [f"s{k}" for k in range(12)]
    slides = tmp_path / "slides.parquet"
    pd.DataFrame({"slide_id": ids, "embedding": list(rng.normal(size=(12, 64)).astype(np.float32)), "n_tiles": 10,
                  "encoder": "tiny", "pool": "mean"}).to_parquet(slides)
    labels = ["a" if k % 2 else "b" for k in range(12)]
    pd.DataFrame({"slide_id": ids[:8], "label": labels[:8]}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"slide_id": ids[8:], "label": labels[8:]}).to_csv(tmp_path / "test.csv", index=False)
    probe = ["probe", "--embeddings", str(slides), "--labels", str(tmp_path / "train.csv"), "--test-labels",
             str(tmp_path / "test.csv"), "--out", str(tmp_path / "probe"), "--shots", "all", "--seeds", "1",
             "--n-boot", "20"]
    assert cli_main(probe) == 0
    first = (tmp_path / "probe" / "metrics.json").read_text()
    assert cli_main(probe) == 0 and (tmp_path / "probe" / "metrics.json").read_text() == first

    model = tmp_path / "model"
    build_tiny_model(tmp_path / "build").save_pretrained(model)
    zeroshot = ["zeroshot", "--model", str(model), "--embeddings", str(slides), "--classes", "A=a", "B=b", "--out",
                str(tmp_path / "zs"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert cli_main(zeroshot) == 0 and cli_main(zeroshot) == 0
    assert (tmp_path / "zs" / "predictions.csv").is_file()
    assert cli_main([*zeroshot[:-4], str(tmp_path / "probe"), *zeroshot[-3:]]) == 2  # another command's folder


def test_eval_retrieval_out_that_is_a_folder_is_named_before_evaluating(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`eval retrieval --out` is a file: a folder there was refused only after the whole evaluation."""
    absent = str(tmp_path / "absent")
    argv = ["eval", "retrieval", "--model", absent, "--pairs", absent, "--embeddings", absent, "--out", str(tmp_path)]
    with caplog.at_level(logging.ERROR):
        assert cli_main(argv) == 2
    assert f"{tmp_path}: is a folder, and this output is a file" in caplog.text


def test_demo_refuses_a_folder_of_the_users_files(tmp_path: Path) -> None:
    """A re-run of the demo deletes its own `align/` before retraining: never a user's folder of that name."""
    mine = tmp_path / "mine"
    (mine / "align").mkdir(parents=True)
    (mine / "align" / "notes.txt").write_text("precious")
    assert cli_main(["demo", "--out", str(mine), "--no-progress"]) == 2
    assert (mine / "align" / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in mine.iterdir()) == ["align"]


def test_train_on_a_full_disk_says_so_and_where(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint or model that did not fit was reported as "a damaged or foreign input file"."""
    from tests.support.full_disk import full_disk

    config = _config(tmp_path / "data", tmp_path / "unused")
    with full_disk(tmp_path / "full", room=64 << 10) as disk:
        out = disk / "run"
        argv = ["train", "--pairs", config.pairs, "--embeddings", config.embeddings, "--text-encoder",
                config.text_encoder, "--max-length", "8", "--proj-dim", "8", "--epochs", "1", "--batch-size", "4",
                "--out", str(out), "--no-progress"]
        assert cli_main(argv) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].startswith(f"disk full at {out}"), errors
        assert "damaged or foreign" not in errors[0]
        assert not [p.name for p in out.rglob("*.part")] if out.exists() else True


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_train_outputs_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """safetensors writes 0600: `model/` and `last/model.safetensors` were private whatever the umask."""
    import os

    previous = os.umask(umask)
    try:
        train(_config(tmp_path / "data", tmp_path / "run"))
    finally:
        os.umask(previous)
    out = tmp_path / "run"
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert out / "model" / "model.safetensors" in files and out / "last" / "model.safetensors" in files
    wrong = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != 0o666 & ~umask}
    assert not wrong, f"expected {oct(0o666 & ~umask)}"
    folders = [p for p in out.rglob("*") if p.is_dir()]
    assert all(p.stat().st_mode & 0o777 == 0o777 & ~umask for p in folders)


def test_ctrl_c_during_train_is_one_line_naming_the_checkpoint_and_the_resume(tmp_path: Path) -> None:
    """SIGINT printed a 30-line KeyboardInterrupt traceback; now: where the last checkpoint is, how to resume,
    exit code 130 (the shell's for SIGINT). A real `vlm train` process, interrupted after its first checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config = _config(tmp_path / "data", tmp_path / "unused")
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "vlm", "train", "--pairs", config.pairs, "--embeddings",
            config.embeddings, "--text-encoder", config.text_encoder, "--max-length", "8", "--proj-dim", "8",
            "--epochs", "100000", "--batch-size", "4", "--checkpoint-every", "1", "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # As from a terminal: a process started in the background of a non-interactive shell (as CI may run the
    # suite) inherits SIGINT ignored, and Python then keeps ignoring it (the Unix convention vlm follows).
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:  # the child is killed whatever happens: a failed run of this test leaves no training behind
        deadline = time.monotonic() + 120
        while not (out / CHECKPOINT).is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / CHECKPOINT).is_file(), process.communicate(timeout=5)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.endswith(f"the last checkpoint is {out / CHECKPOINT}; continue with: vlm train --resume {out}"), stderr

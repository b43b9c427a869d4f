"""A newcomer's path: output file modes, `--help`, offline encoders from the command line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlm.io import atomic_dir, atomic_path
from vlm.resources import REAL_SLIDE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_outputs_follow_the_umask(tmp_path: Path, umask_022: None) -> None:
    """Temporary files of atomic writes are 0600 / 0700; what is renamed into place must follow the umask."""
    with atomic_path(tmp_path / "summary.md") as tmp:
        tmp.write_text("hi")
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
    assert _mode(tmp_path / "summary.md") == 0o644
    assert _mode(tmp_path / "model") == 0o755
    assert _mode(tmp_path / "model" / "model.safetensors") == 0o644


def test_tile_command_outputs_follow_the_umask(tmp_path: Path, umask_022: None, real_slide: Path) -> None:
    """A real command's outputs (tile grid HDF5 files, QC thumbnails) are readable by the group and others."""
    from vlm.cli import main

    assert main(["tile", str(real_slide), "--out", str(tmp_path / "tiles"), "--no-progress"]) == 0
    written = [p for p in (tmp_path / "tiles").rglob("*") if p.is_file()]
    assert written
    assert {p.name: _mode(p) for p in written} == {p.name: 0o644 for p in written}


def _parsers():
    """Every (sub)command parser of `vlm`, with its full name."""
    import argparse

    from vlm.cli import build_parser

    def walk(parser: argparse.ArgumentParser, name: str):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}")

    return list(walk(build_parser(), "vlm"))


def test_every_command_has_a_description_and_shows_its_defaults() -> None:
    import re

    for name, parser in _parsers():
        assert parser.description, f"`{name} --help` has no description"
        page = parser.format_help()
        for action in parser._actions:
            default = action.default
            if action.option_strings and default is not None and default is not False and default != "==SUPPRESS==":
                if action.dest in ("help", "version"):
                    continue
                flag = action.option_strings[0]
                entry = re.search(rf"^  {flag}\b.*?(?=^  -|\Z)", page, re.M | re.S)
                shown = entry is not None and "(default: " in " ".join(entry.group(0).split())
                assert shown, f"`{name} --help` hides the default of {flag}"
                assert not re.search(r"\(default[ )]", action.help or ""), f"{name} {flag}: default written twice"
    pages = dict(_parsers())
    assert "(default: 12)" in " ".join(pages["vlm demo"].format_help().split())
    assert "(default: 1 5 10)" in " ".join(pages["vlm eval retrieval"].format_help().split())
    assert "(default: 0)" in " ".join(pages["vlm probe"].format_help().split())  # --seed: 0 is a default too


@pytest.mark.parametrize("flag", ["--precision", "--pool"])
def test_train_checks_precision_and_pool_choices(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    from vlm.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--pairs", "p.csv", "--out", "o", flag, "bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _vlm(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real `vlm` command in a fresh process (hub settings are read at import)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "vlm", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def random_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tile features of the real slide from timm's ResNet-10-T with random weights, from the command line."""
    out = tmp_path_factory.mktemp("random") / "features"
    result = _vlm("embed-tiles", str(REAL_SLIDE), "--out", str(out), "--tile-encoder", "timm:resnet10t",
                  "--random-weights", "--seed", "3", "--no-progress", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_random_weights_from_the_command_line_are_seeded(random_features: Path, tmp_path: Path) -> None:
    from vlm.cli import main
    from vlm.formats.features import read_features

    first = read_features(random_features / "cmu_small_region.h5").features
    assert first.shape[1] == 512  # ResNet-10-T's width, not the tiny slide preset's 32
    for seed, same in (("3", True), ("4", False)):
        assert main(["embed-tiles", str(REAL_SLIDE), "--out", str(tmp_path / seed), "--tile-encoder",
                     "timm:resnet10t", "--random-weights", "--seed", seed, "--no-progress", "--device", "cpu"]) == 0
        again = read_features(tmp_path / seed / "cmu_small_region.h5").features
        assert np.array_equal(first, again) is same


def test_tiny_slide_encoder_takes_the_feature_width_from_the_files(random_features: Path, tmp_path: Path) -> None:
    from vlm.cli import main
    from vlm.formats.embeddings import read_slide_embeddings

    out = tmp_path / "slides.parquet"
    assert main(["embed-slides", str(random_features), "--out", str(out), "--slide-encoder", "tiny",
                 "--random-weights", "--seed", "1", "--no-progress", "--device", "cpu"]) == 0
    frame = read_slide_embeddings(out)
    assert len(frame) == 1 and len(frame["embedding"][0]) == 64  # tiny embed_dim
    assert main(["embed-slides", str(random_features), "--out", str(tmp_path / "again.parquet"),
                 "--slide-encoder", "tiny", "--random-weights", "--seed", "1", "--no-progress", "--device", "cpu"]) == 0
    assert np.array_equal(frame["embedding"][0], read_slide_embeddings(tmp_path / "again.parquet")["embedding"][0])
    # an explicit --in-dim that the files contradict: one clear error, nothing written
    bad = tmp_path / "bad.parquet"
    assert main(["embed-slides", str(random_features), "--out", str(bad), "--slide-encoder", "tiny",
                 "--random-weights", "--in-dim", "32", "--no-progress", "--device", "cpu"]) == 2
    assert not bad.exists()


def test_random_weights_and_checkpoint_exclude_each_other(random_features: Path, tmp_path: Path) -> None:
    from vlm.cli import main

    assert main(["embed-slides", str(random_features), "--out", str(tmp_path / "x.parquet"), "--slide-encoder",
                 "tiny", "--random-weights", "--checkpoint", str(tmp_path / "w.pth")]) == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "gated"),
    [
        (["embed-tiles", str(REAL_SLIDE), "--tile-encoder", "gigapath"], True),
        (["embed-tiles", str(REAL_SLIDE), "--tile-encoder", "timm:resnet10t"], False),
        (["embed-slides", "{features}", "--slide-encoder", "gigapath"], True),
    ],
    ids=["tile-gigapath", "tile-timm", "slide-gigapath"],
)
@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE", "unreachable"])
def test_hub_weights_fail_fast_with_one_message(
    command: list[str], gated: bool, network: str, random_features: Path, tmp_path: Path
) -> None:
    """Offline (or with the hub unreachable) a hub-weight encoder fails in seconds, with one message that says
    whether the repo is gated and how to go on without network; a failure (1), not a usage error (2)."""
    import time

    env = {"HF_HUB_OFFLINE": "1"} if network == "HF_HUB_OFFLINE" else {
        "HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}
    args = [a.replace("{features}", str(random_features)) for a in command]
    start = time.perf_counter()
    result = _vlm(*args, "--out", str(tmp_path / "out"), "--no-progress", env=env)
    elapsed = time.perf_counter() - start
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    message = errors[0]
    assert ("is gated" in message) is gated and ("not gated" in message) is (not gated)
    for hint in ("--checkpoint", "--random-weights", "HF_HUB_OFFLINE", "docs/weights.md ('Real weights"):
        assert hint in message
    assert "Retrying" not in result.stderr and "WARNING" not in result.stderr
    assert elapsed < 25  # imports included; the hub's own retries took 32 s
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.h5"))


def test_the_weights_page_the_message_names_exists() -> None:
    """The hub error sends the user to a docs page: that page exists and has the section the message names."""
    from vlm.hub import WEIGHTS_DOC

    page, section = WEIGHTS_DOC.removesuffix("')").split(" ('")
    assert f"# {section}\n" in (Path(__file__).parents[1] / page).read_text()


def test_text_encoder_from_the_hub_fails_fast_offline() -> None:
    """The default text tower (PubMedBERT, public) offline: one message naming --text-encoder FOLDER, at once."""
    import time

    from vlm.encoders.text import load_text_encoder
    from vlm.hub import WeightsUnavailable
    from vlm.settings import DEFAULT_TEXT_ENCODER

    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match=r"not gated.*--text-encoder FOLDER.*HF_HUB_OFFLINE") as info:
        load_text_encoder(DEFAULT_TEXT_ENCODER)
    assert "--random-weights" not in str(info.value)  # vlm train has no random text tower
    assert time.perf_counter() - start < 10


def test_faiss_loader_lines_are_quiet(tmp_path: Path) -> None:
    result = _vlm("search", "--index", str(tmp_path / "missing"), "query")
    assert result.returncode == 2
    assert "faiss.loader" not in result.stderr and "AVX512" not in result.stderr
    assert "not an index folder" in result.stderr


def test_roc_curves_that_coincide_stay_visible_and_titles_give_n_and_auc() -> None:
    """Three perfect classes: identical ROC curves. Each class's colour must show beyond its legend entry."""
    import io

    from PIL import Image

    from vlm.plots import roc_png

    labels = np.repeat([0, 1, 2], 4)
    probabilities = np.eye(3)[labels] * 0.8 + 0.1
    image = np.asarray(Image.open(io.BytesIO(roc_png(labels, probabilities, ["a", "b", "c"]))).convert("RGB"))
    for colour in ("#1f77b4", "#ff7f0e", "#2ca02c"):  # matplotlib's first three cycle colours
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(image.astype(int) - rgb).sum(-1) < 60).sum() > 300, f"the {colour} curve is hidden"


def test_plot_titles_give_n_and_macro_auc(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlm import plots

    titles: list[str] = []
    monkeypatch.setattr(plots, "_png", lambda figure: titles.append(figure.axes[0].get_title()) or b"")
    labels = np.repeat([0, 1, 2], 4)
    plots.roc_png(labels, np.eye(3)[labels] * 0.8 + 0.1, ["a", "b", "c"], title="task")
    plots.confusion_png(np.diag([4, 4, 4]), ["a", "b", "c"], title="task")
    assert titles == ["task\nn = 12, macro AUC 1.000", "task\nn = 12"]


def test_retrieval_warns_when_k_exceeds_what_class_sizes_allow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """4 slides per class: MVAcc@10 cannot be won by a majority; the evaluation must say so, not print 0.000."""
    import logging

    import pandas as pd

    from vlm.retrieval.evaluate import _label_metrics

    labels = np.repeat(["a", "b", "c"], 4)
    vectors = np.eye(3)[np.repeat([0, 1, 2], 4)] + 0.01 * np.random.default_rng(0).normal(size=(12, 3))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    path = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": [f"s{i}" for i in range(12)], "label": labels}).to_csv(path, index=False)
    ids = [f"s{i}" for i in range(12)]
    with caplog.at_level(logging.WARNING):
        out = _label_metrics(ids, vectors, path, [1, 5, 10], n_boot=50, seed=0)
    assert out["MVAcc@10"]["value"] == 0.0 and out["Acc@10"]["value"] == 1.0  # perfect embeddings, yet 0
    assert len(out["warnings"]) == 1 and "MVAcc@10" in out["warnings"][0] and "K <= 6" in out["warnings"][0]
    assert "MVAcc@10" in caplog.text and "MVAcc@5" not in caplog.text

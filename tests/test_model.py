"""The aligned model: save/load round trip, refusal of mismatched files, losses from open_clip, metrics."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import open_clip.loss
import pytest
import torch

from tests.support.models import build_tiny_model
from vlm.metrics import recall_at_k, retrieval_recalls
from vlm.model import SlideTextModel
from vlm.model.loss import contrastive_loss, create_loss

TEXTS = ["invasive ductal carcinoma of the breast", "squamous cell carcinoma of the lung", "benign colon"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[SlideTextModel, Path]:
    root = tmp_path_factory.mktemp("model")
    model = build_tiny_model(root, slide_embed_dim=64, proj_dim=32).eval()
    return model, model.save_pretrained(root / "model")


def test_encoders_return_unit_vectors(saved: tuple[SlideTextModel, Path]) -> None:
    model, _ = saved
    text = model.encode_text(TEXTS, batch_size=2)
    slides = model.encode_slide_embeddings(torch.randn(4, 64))
    assert text.shape == (3, 32) and slides.shape == (4, 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(slides.norm(dim=-1), torch.ones(4))


def test_save_load_round_trip_is_identical(saved: tuple[SlideTextModel, Path]) -> None:
    model, path = saved
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    loaded = SlideTextModel.from_pretrained(path)
    embeddings = torch.randn(5, 64)
    assert torch.equal(loaded.encode_text(TEXTS), model.encode_text(TEXTS))
    assert torch.equal(loaded.encode_slide_embeddings(embeddings), model.encode_slide_embeddings(embeddings))
    assert torch.equal(loaded.logit_scale, model.logit_scale)


def test_mismatched_config_is_refused(saved: tuple[SlideTextModel, Path], tmp_path: Path) -> None:
    _, path = saved
    broken = shutil.copytree(path, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["proj_dim"] = 16
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not saved with this config.json"):
        SlideTextModel.from_pretrained(broken)
    config["proj_dim"] = 32
    config["colour"] = "blue"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown config keys"):
        SlideTextModel.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="missing"):
        SlideTextModel.from_pretrained(tmp_path)


def test_weights_from_another_model_are_refused(saved: tuple[SlideTextModel, Path], tmp_path: Path) -> None:
    _, path = saved
    other = build_tiny_model(tmp_path / "other", slide_embed_dim=48, proj_dim=32).save_pretrained(tmp_path / "m2")
    mixed = shutil.copytree(path, tmp_path / "mixed")
    shutil.copy(other / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(ValueError, match="architecture hash differs"):
        SlideTextModel.from_pretrained(mixed)


def test_a_flipped_byte_in_the_weights_is_refused(saved: tuple[SlideTextModel, Path], tmp_path: Path) -> None:
    """safetensors checks no data: one flipped byte in a weight loaded as a silently different model."""
    _, path = saved
    damaged = shutil.copytree(path, tmp_path / "damaged")
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's bytes, past the JSON header
    (damaged / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged/model\.safetensors: its weights do not match the checksum"):
        SlideTextModel.from_pretrained(damaged)


def test_resave_replaces_folder_atomically(saved: tuple[SlideTextModel, Path], tmp_path: Path) -> None:
    model, _ = saved
    target = model.save_pretrained(tmp_path / "m")
    model.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_slide_tower_absent_in_frozen_model(saved: tuple[SlideTextModel, Path]) -> None:
    model, _ = saved
    with pytest.raises(ValueError, match="encode_slide_embeddings"):
        model.encode_slides(torch.randn(1, 4, 1536), torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="64-d"):
        model.encode_slide_embeddings(torch.randn(2, 768))


def test_logit_scale_init_and_clamp(saved: tuple[SlideTextModel, Path]) -> None:
    model, _ = saved
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))


def test_losses_are_open_clip() -> None:
    assert type(create_loss("clip")) is open_clip.loss.ClipLoss
    assert type(create_loss("siglip")) is open_clip.loss.SigLipLoss
    with pytest.raises(ValueError, match="clip, siglip"):
        create_loss("triplet")
    features = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    perfect = contrastive_loss(create_loss("clip"), features, features, torch.tensor(100.0))
    shuffled = contrastive_loss(create_loss("clip"), features, features.roll(1, 0), torch.tensor(100.0))
    assert perfect < shuffled
    with pytest.raises(ValueError, match="logit bias"):
        contrastive_loss(create_loss("siglip"), features, features, torch.tensor(10.0))


def test_recall_at_k() -> None:
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.0, 0.0, 0.0]])
    # row 0: pair first; row 1: pair second; row 2: tied with everything -> ranked last
    assert recall_at_k(similarity, ks=(1, 2, 3)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    unit = torch.eye(4)
    recalls = retrieval_recalls(unit, unit, ks=(1,))
    assert recalls == {"report_to_slide/R@1": 1.0, "slide_to_report/R@1": 1.0, "mean_recall": 1.0}


def test_model_with_slide_encoder_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("vlm.encoders.slide")
    model = build_tiny_model(tmp_path, slide_encoder="tiny", proj_dim=16).eval()
    features, coords = torch.randn(2, 9, 32), torch.randint(0, 4000, (2, 9, 2)).float()
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    loaded = SlideTextModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert (
        loaded.config.slide_encoder == "tiny"
        and loaded.config.slide_encoder_config == model.config.slide_encoder_config
    )
    expected = model.encode_slides(features, coords, mask)
    assert expected.shape == (2, 16)
    torch.testing.assert_close(loaded.encode_slides(features, coords, mask), expected, rtol=0, atol=0)


def test_the_config_a_model_is_built_from_is_not_changed(tmp_path: Path) -> None:
    """The model fills in the text and slide-encoder configs on its own copy, never on the caller's."""
    import dataclasses

    from tests.support.models import build_tiny_text_encoder
    from vlm.encoders.slide import create_slide_encoder
    from vlm.encoders.text import load_text_encoder
    from vlm.model.clip import SlideTextConfig

    text_dir = build_tiny_text_encoder(tmp_path / "text")
    config = SlideTextConfig(slide_embed_dim=64, proj_dim=8, slide_encoder="tiny")
    before = dataclasses.asdict(config)
    model = SlideTextModel(config, load_text_encoder(text_dir, max_length=32), create_slide_encoder("tiny"))
    assert dataclasses.asdict(config) == before
    assert model.config is not config and model.config.text_config and model.config.slide_encoder_config
    assert model.config.slide_encoder_config["embed_dim"] == 64


def test_strict_loading_names_every_key_that_does_not_fit() -> None:
    from vlm.weights import load_state_strict

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    state = {"0.weight": torch.zeros(2, 4), "0.bias": torch.zeros(2), "2.weight": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match=r"w\.pt does not fit the Sequential: missing keys \['1\.bias', '1\.weight'\], "
                       r"unexpected keys \['2\.weight'\], wrong shapes \['0\.weight \(2, 4\) != \(2, 3\)'\]; retrain"):
        load_state_strict(model, state, "w.pt", "retrain")
    load_state_strict(model, model.state_dict(), "w.pt", "retrain")

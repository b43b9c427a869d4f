"""Tiny random models built in code for offline tests and benches (the hub is out of reach).

`build_tiny_text_encoder(folder)` writes a 2-layer BERT and a local WordPiece tokenizer that
`load_text_encoder(folder)` and `vlm train --text-encoder folder` accept like any hub model;
`build_tiny_model(folder)` builds a whole random `SlideTextModel` around it in about a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vlm.model.clip import SlideTextModel, create_model

_TINY_WORDS = (
    "the a of and in with is are no not shows show showing slide tissue tumor tumour carcinoma "
    "adenocarcinoma "
    "squamous cell cells lung breast colon renal clear papillary invasive ductal lobular margin margins "
    "negative positive grade high low well moderately poorly differentiated lymph node nodes metastasis "
    "necrosis stroma mitoses report diagnosis specimen biopsy resection benign malignant histology class"
).split()


def build_tiny_text_encoder(
    folder: str | os.PathLike[str],
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    dropout: float = 0.1,
    seed: int = 0,
) -> Path:
    """Write a tiny random BERT and a local WordPiece tokenizer to `folder`; return the folder.

    For offline tests (here and in other modules' tests): `load_text_encoder(folder)` and
    `vlm train --text-encoder folder` accept it like any hub model. The vocabulary holds special tokens,
    some pathology words and single characters (plus `##` continuations), so any lowercase text tokenises.
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:-()/%")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_TINY_WORDS, *chars, *(f"##{c}" for c in chars)]
    vocab = list(dict.fromkeys(vocab))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # Loading from the folder (not `BertTokenizer(vocab_file=...)`, whose argument transformers 5 renamed
    # to `vocab` and silently ignores otherwise) works the same on transformers 4 and 5.
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512})
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}: vocab not loaded")
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=512,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(str(folder))
    return folder


def build_tiny_model(
    folder: str | os.PathLike[str],
    slide_embed_dim: int = 64,
    proj_dim: int = 32,
    slide_encoder: str | None = None,
    seed: int = 0,
) -> SlideTextModel:
    """A tiny random model for offline tests: a 2-layer 32-wide BERT (written to `folder/text`) and cached
    slide embeddings of `slide_embed_dim` (or the `slide_encoder` preset, e.g. "tiny").

    Save it with `save_pretrained(...)` to get a `--model` folder for other commands' tests.
    """
    text_dir = build_tiny_text_encoder(Path(folder) / "text", seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_model(
            text_encoder=text_dir,
            slide_embed_dim=None if slide_encoder else slide_embed_dim,
            slide_encoder=slide_encoder,
            proj_dim=proj_dim,
            max_length=64,
        )

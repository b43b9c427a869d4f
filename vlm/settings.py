"""Named values of settings that the library and the command line share, in a module that imports nothing heavy.

Each closed set of choices is defined here once: the library validates against it (`resolve precision`,
`create_loss`, ...) and the command line offers it as argparse `choices`, without `vlm --help` loading torch
or FAISS. The modules that own a concept re-export its tuple (`vlm.device.PRECISIONS`, ...).
"""

from __future__ import annotations

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")  # autocast dtypes; "auto" = bf16 where supported
POOLS: tuple[str, ...] = ("mean", "cls", "all-layers")  # slide encoder outputs
LOSSES: tuple[str, ...] = ("clip", "siglip")  # open_clip's contrastive losses
READERS: tuple[str, ...] = ("auto", "openslide", "tifffile")  # slide pixel readers; "auto" by format (vlm.wsi.readers)
INDEX_KINDS: tuple[str, ...] = ("auto", "flat", "ivf", "hnsw", "ivfpq")  # FAISS index kinds; "auto" by size

N_BOOT = 1000  # bootstrap replicates of every confidence interval

DEFAULT_TEXT_ENCODER = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"  # PubMedBERT
DEFAULT_MAX_LENGTH = 256  # tokens per report; longer ones are truncated

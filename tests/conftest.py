"""Shared test setup: offline, CPU, few threads, deterministic."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from vlm.wsi.synthetic import write_pyramidal_tiff  # noqa: E402

DATA = Path(__file__).parent / "data"
REAL_SLIDE = DATA / "cmu_small_region.svs"

# Synthetic slides: white glass with one rectangle of textured pink "tissue" at a known place.
# At 0.5 mpp a tile is 256 level-0 px; at 0.25 mpp it is 512. The rectangle spans 4 x 2 tiles.
TISSUE_05 = (512, 768, 1536, 1280)  # x0, y0, x1, y1 in level-0 px
TISSUE_025 = (1024, 1536, 3072, 2560)


def tissue_image(width: int, height: int, box: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """White background with H&E-like pink/purple noise inside `box` (level-0 px)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 245, np.uint8)
    x0, y0, x1, y1 = box
    noise = rng.integers(-25, 25, size=(y1 - y0, x1 - x0, 1))
    base = np.array([200, 110, 170])
    image[y0:y1, x0:x1] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return image


@pytest.fixture(scope="session")
def real_slide() -> Path:
    return REAL_SLIDE


@pytest.fixture(scope="session")
def slide_05(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lossless 3-level 0.5-mpp pyramid, 2048 x 1536 px."""
    path = tmp_path_factory.mktemp("slides") / "synthetic_05.tiff"
    write_pyramidal_tiff(path, (2048, 1536), tissue_image(2048, 1536, TISSUE_05), mpp=0.5, compression=None)
    return path


@pytest.fixture(scope="session")
def slide_025(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JPEG 3-level 0.25-mpp pyramid, 4096 x 3072 px."""
    path = tmp_path_factory.mktemp("slides") / "synthetic_025.tiff"
    write_pyramidal_tiff(path, (4096, 3072), tissue_image(4096, 3072, TISSUE_025, seed=1), mpp=0.25)
    return path


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights of timm's vit_tiny_patch16_224 (5.7 M parameters), saved as a local checkpoint."""
    from vlm.encoders.tile import create_tile_encoder

    encoder = create_tile_encoder("timm:vit_tiny_patch16_224", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.pth"
    torch.save(encoder.model.state_dict(), path)
    return path

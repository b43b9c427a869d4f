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

from tests.support.synthetic import TISSUE_025, TISSUE_05, tissue_image  # noqa: E402
from vlm.resources import REAL_SLIDE  # noqa: E402
from vlm.wsi.synthetic import write_pyramidal_tiff  # noqa: E402


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


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's output: the run CI just made (`VLM_DEMO_OUT`, set by .ci/run after `make demo`), else a
    fresh run with the same settings as `make demo` (once per session, shared by every test that needs it)."""
    from vlm.demo.run import DemoSettings, run_demo

    given = os.environ.get("VLM_DEMO_OUT")
    if given and (Path(given) / "summary.md").is_file():
        return Path(given).resolve()  # absolute: notebooks run in notebooks/, not here
    out = tmp_path_factory.mktemp("demo")
    run_demo(DemoSettings(out=out, progress=False))
    return out

"""Device and precision resolution (one place for every stage)."""

from __future__ import annotations

import pytest
import torch

from vlm.device import autocast, autocast_dtype, resolve_device, resolve_shard_device


def test_auto_picks_cuda_only_when_present() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused_not_silently_cpu() -> None:
    with pytest.raises(ValueError, match="CUDA is not available.*`device` cpu"):
        resolve_device("cuda")


def test_precision_names() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cpu, "fp32") is None
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast_dtype(cpu, "bf16")
    with pytest.raises(ValueError, match="unknown precision"):
        autocast_dtype(cpu, "fp8")
    with autocast(cpu, "auto"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


def test_shards_keep_the_cpu() -> None:
    assert resolve_shard_device("cpu", 3, 4) == torch.device("cpu")

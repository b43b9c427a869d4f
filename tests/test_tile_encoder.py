"""The tile-encoder registry: real timm classes, built tiny with random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

from vlm.encoders.tile import IMAGENET_MEAN, IMAGENET_STD, TILE_ENCODERS, create_tile_encoder

TINY = dict(embed_dim=48, depth=2, num_heads=2)


def test_gigapath_spec_matches_the_published_architecture() -> None:
    spec = TILE_ENCODERS["gigapath"]
    assert spec.timm_name == "vit_giant_patch14_dinov2"
    assert spec.model_args == dict(img_size=224, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                                   init_values=1e-5, mlp_ratio=5.33334, num_classes=0)
    assert spec.hub_id == "prov-gigapath/prov-gigapath"


def test_tiny_gigapath_architecture_and_transform() -> None:
    encoder = create_tile_encoder("gigapath", pretrained=False, **TINY)
    assert type(encoder.model).__name__ == "VisionTransformer"
    assert encoder.model.patch_embed.patch_size == (16, 16)
    assert encoder.output_dim == 48
    steps = encoder.transform.transforms
    assert isinstance(steps[0], transforms.Resize) and steps[0].size == 256
    assert steps[0].interpolation == transforms.InterpolationMode.BICUBIC
    assert isinstance(steps[1], transforms.CenterCrop) and steps[1].size == (224, 224)
    assert tuple(steps[3].mean) == IMAGENET_MEAN and tuple(steps[3].std) == IMAGENET_STD
    image = encoder.transform(Image.new("RGB", (256, 256), (200, 100, 150)))
    assert image.shape == (3, 224, 224)
    with torch.inference_mode():
        assert encoder(image[None]).shape == (1, 48)


def test_local_checkpoint_round_trip(tmp_path: Path) -> None:
    first = create_tile_encoder("gigapath", pretrained=False, **TINY)
    torch.save(first.model.state_dict(), tmp_path / "w.pth")
    second = create_tile_encoder("gigapath", checkpoint=tmp_path / "w.pth", **TINY)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(first(x), second(x))


def test_mismatched_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    torch.save(create_tile_encoder("gigapath", pretrained=False, **TINY).model.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"w\.pth does not fit the 'gigapath' architecture"):
        create_tile_encoder("gigapath", checkpoint=tmp_path / "w.pth", embed_dim=96, depth=2, num_heads=2)
    with pytest.raises(FileNotFoundError, match="no such file"):
        create_tile_encoder("gigapath", checkpoint=tmp_path / "absent.pth")


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_checkpoint_names_the_file(tmp_path: Path, damage: str) -> None:
    """A cut-short checkpoint gave a bare "[Errno 22] Invalid argument", an empty one a bare EOFError."""
    torch.save(create_tile_encoder("gigapath", pretrained=False, **TINY).model.state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "w.pth").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(ValueError, match=r"tile encoder checkpoint .*w\.pth: not a readable checkpoint"):
        create_tile_encoder("gigapath", checkpoint=tmp_path / "w.pth", **TINY)


def test_any_timm_model_by_name_uses_its_own_preprocessing() -> None:
    encoder = create_tile_encoder("timm:resnet18", pretrained=False)
    assert encoder.name == "timm:resnet18" and encoder.output_dim == 512
    with torch.inference_mode():
        assert encoder(torch.randn(1, 3, 224, 224)).shape == (1, 512)


def test_output_dim_is_the_pooled_output_width() -> None:
    encoder = create_tile_encoder("timm:mobilenetv3_small_100", pretrained=False)  # has a pre-logits head
    with torch.inference_mode():
        assert encoder(torch.randn(1, 3, 224, 224)).shape == (1, encoder.output_dim)


def test_unknown_names_list_close_matches() -> None:
    with pytest.raises(ValueError, match="Did you mean gigapath"):
        create_tile_encoder("gigpath")
    with pytest.raises(ValueError, match="close matches: .*resnet18"):
        create_tile_encoder("timm:resnet_18", pretrained=False)


def test_hub_weights_offline_fail_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="huggingface-cli login.*--checkpoint"):
        create_tile_encoder("gigapath")


def test_a_timm_name_with_a_pretrained_tag_is_known() -> None:
    """`arch.tag` names (timm's own listing) are models too; the tag picks that weight's data config."""
    encoder = create_tile_encoder("timm:resnet10t.c3_in1k", pretrained=False)
    assert encoder.name == "timm:resnet10t.c3_in1k" and encoder.output_dim == 512
    assert encoder.transform.transforms[1].size == (176, 176)  # resnet10t.c3_in1k is trained at 176 px


def test_gigapath_is_timm_configuration_and_its_transform_is_timm_s() -> None:
    """The registry entry is a timm data config; the model carries it, and the transform comes from it."""
    from timm.data import create_transform, resolve_model_data_config

    encoder = create_tile_encoder("gigapath", pretrained=False, **TINY)
    config = resolve_model_data_config(encoder.model)
    assert config["input_size"] == (3, 224, 224) and config["crop_pct"] == 224 / 256
    assert config["mean"] == IMAGENET_MEAN and config["std"] == IMAGENET_STD
    image = Image.new("RGB", (300, 260), (200, 100, 150))
    expected = create_transform(**config, is_training=False)(image)
    assert torch.equal(encoder.transform(image), expected)

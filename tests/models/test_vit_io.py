"""mrgfast.models.vit_io: a ViT saved as a directory (model.safetensors + vit_config.json) loads back as the same
frozen model with its image config; directories that are not such a ViT are refused naming the problem."""

import json

import pytest
import torch

from mrgfast.data.images import ImageConfig
from mrgfast.models.vit import ViT
from mrgfast.models.vit_io import VIT_CONFIG, VIT_WEIGHTS, is_vit_dir, load_vit, save_vit

ARGS = dict(image_size=8, patch_size=4, in_channels=1, dim=8, depth=1, heads=2, pos_embed="sincos")
IMAGE = ImageConfig(size=8, mean=(0.25,), std=(0.5,), channels=1, resample="bilinear")


def tiny_vit() -> ViT:
    """A tiny grayscale ViT with every weight random (CLS token and LayerNorms included), in training mode."""
    torch.manual_seed(0)
    vit = ViT(**ARGS)
    with torch.no_grad():
        for param in vit.parameters():
            param.normal_()
    return vit


def test_save_and_load_round_trip(tmp_path):
    vit = tiny_vit()
    save_vit(vit, tmp_path / "vit", ARGS, IMAGE, image_tokens=5)
    assert sorted(p.name for p in (tmp_path / "vit").iterdir()) == sorted([VIT_CONFIG, VIT_WEIGHTS])
    loaded, image_config, config = load_vit(tmp_path / "vit")
    assert isinstance(loaded, ViT) and loaded.grid == vit.grid and loaded.dim == vit.dim
    assert loaded.state_dict().keys() == vit.state_dict().keys()
    for key, value in vit.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # Frozen and in eval mode, whatever the saved model was.
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).features, vit.eval()(images).features, rtol=0, atol=0)
    assert image_config == IMAGE and isinstance(image_config.mean, tuple) and isinstance(image_config.std, tuple)
    assert config["model_type"] == "mrgfast_vit" and config["vit"] == ARGS and config["image_tokens"] == 5


def test_is_vit_dir(tmp_path):
    assert not is_vit_dir(tmp_path) and not is_vit_dir(tmp_path / "missing")
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / VIT_WEIGHTS).write_bytes(b"")
    assert not is_vit_dir(tmp_path / "weights-only")
    save_vit(tiny_vit(), tmp_path / "vit", ARGS, IMAGE)
    assert is_vit_dir(tmp_path / "vit") and is_vit_dir(str(tmp_path / "vit"))


def test_a_directory_without_vit_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vit_config\.json not found: expected an mrgfast ViT directory"):
        load_vit(tmp_path)


@pytest.mark.parametrize("config, got", [
    ({"model_type": "other", "vit": ARGS}, "'other'"),
    ({"vit": ARGS}, "None"),
    ({"model_type": "mrgfast_vit"}, "'mrgfast_vit'"),  # the right type without its constructor arguments
])
def test_a_config_of_another_model_is_refused(tmp_path, config, got):
    (tmp_path / VIT_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"model_type must be 'mrgfast_vit' with a 'vit' object, got {got}"):
        load_vit(tmp_path)

"""Saving and loading mrgfast's own ViT as a directory: model.safetensors + vit_config.json (no hub format)."""

import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from mrgfast.data.images import ImageConfig
from mrgfast.models.vit import ViT

VIT_CONFIG = "vit_config.json"
VIT_WEIGHTS = "model.safetensors"
MODEL_TYPE = "mrgfast_vit"


def is_vit_dir(path) -> bool:
    """Whether `path` is a directory written by save_vit (it holds vit_config.json)."""
    return (Path(path) / VIT_CONFIG).is_file()


def save_vit(vit: ViT, out_dir: Path, constructor_args: dict, image_config: ImageConfig, **extra) -> None:
    """model.safetensors + vit_config.json (ViT constructor arguments, image preprocessing, and `extra` keys)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(out_dir / VIT_WEIGHTS),
              metadata={"format": "pt"})
    config = {"model_type": MODEL_TYPE, "vit": dict(constructor_args),
              "image_config": dataclasses.asdict(image_config), **extra}
    (out_dir / VIT_CONFIG).write_text(json.dumps(config, indent=1) + "\n")


def load_vit(path) -> tuple:
    """(ViT in eval mode with frozen weights, its ImageConfig, its config dict) from a `save_vit` directory."""
    path = Path(path)
    config_file = path / VIT_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected an mrgfast ViT directory written by save_vit")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != MODEL_TYPE or "vit" not in config:
        raise ValueError(f"{config_file}: model_type must be {MODEL_TYPE!r} with a 'vit' object, got "
                         f"{config.get('model_type')!r}")
    vit = ViT(**config["vit"])
    vit.load_state_dict(load_file(str(path / VIT_WEIGHTS)))
    image = dict(config["image_config"])
    image["mean"], image["std"] = tuple(image["mean"]), tuple(image["std"])
    return vit.eval().requires_grad_(False), ImageConfig(**image), config

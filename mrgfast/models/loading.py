"""load_decoder: build a Decoder from a Hugging Face model directory without instantiating the HF model."""

import json
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from mrgfast.common.names import key_mismatch
from mrgfast.models.config import DecoderConfig, hf_architecture
from mrgfast.models.decoder import Decoder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Checkpoint keys that are not decoder weights: vision towers (loaded elsewhere) and stale RoPE buffers
# some old Llama checkpoints carry.
IGNORED_KEYS = re.compile(r"^(model\.)?visual\.|rotary_emb\.inv_freq$")


def load_decoder(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None) -> Decoder:
    """A Decoder with the weights of the HF directory `path` (config.json + safetensors, sharded or not),
    cast to `dtype` (default: as stored) on `device` (default: CPU); peak memory is about one copy."""
    path = Path(path)
    hf_config = read_config(path)
    arch = hf_architecture(hf_config, str(path / "config.json"))
    config = DecoderConfig.from_hf(hf_config, str(path / "config.json"))
    key_files = checkpoint_keys(path)
    names = {to_decoder_name(key, arch): key for key in key_files if not IGNORED_KEYS.search(key)}
    # The meta device allocates nothing: each Parameter is then replaced by the tensor read from disk.
    with torch.device("meta"):
        decoder = Decoder(config)
    expected = dict(decoder.named_parameters())  # a tied lm_head.weight is listed once, as the embedding
    if config.tie_word_embeddings:
        names.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    check_keys(expected, names, path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    by_file = {}
    for name, key in names.items():
        by_file.setdefault(key_files[key], []).append((name, key))
    for file, entries in by_file.items():
        with safe_open(path / file, framework="pt", device=str(device)) as f:
            for name, key in entries:
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise ValueError(f"{path / file}: {key!r} has shape {tuple(tensor.shape)}, but config.json "
                                     f"implies {tuple(expected[name].shape)}")
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                assign_parameter(decoder, name, tensor)
    decoder.tie_weights()
    return decoder.eval()


def read_config(path: Path) -> dict:
    """config.json of the model directory as a dict; a clear error when it is absent or not JSON."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: load_decoder needs a Hugging Face model directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None


def checkpoint_keys(path: Path) -> dict:
    """Every weight key of the checkpoint -> the safetensors file (relative to `path`) holding it."""
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, framework="pt") as f:
            return {key: SINGLE_FILE for key in f.keys()}
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{path / INDEX_FILE} has no 'weight_map' of key -> shard file")
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise FileNotFoundError(f"{path / shard}, named in {INDEX_FILE}, not found")
        return dict(weight_map)
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" (found {others}: mrgfast loads safetensors only)" if others else ""
    raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}")


def to_decoder_name(key: str, arch: str) -> str:
    """The Decoder parameter name of a checkpoint key: Qwen2-VL saved as `model.language_model.*` (the layout
    of transformers 4.5x) maps to `model.*`; every other key is already a Decoder name."""
    if arch == "Qwen2VLForConditionalGeneration" and key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def check_keys(expected: dict, names: dict, path: Path) -> None:
    """ValueError naming the weights the checkpoint lacks and the ones the Decoder has no place for."""
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(names[n] for n in set(names) - set(expected))
    problems = key_mismatch(missing, unexpected)
    if problems:
        raise ValueError(f"{path}: checkpoint does not match config.json; {problems}")


def assign_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the (meta) parameter `name`, keeping it a trainable nn.Parameter."""
    owner_path, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_path)
    setattr(owner, attr, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))

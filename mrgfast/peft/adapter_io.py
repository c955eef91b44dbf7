"""save_adapter / load_adapter: LoRA adapters in PEFT's on-disk format (safetensors + adapter_config.json)."""

import contextlib
import dataclasses
import json
import pickle
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mrgfast.common.files import atomic_write
from mrgfast.common.names import few
from mrgfast.peft.apply import apply_lora, remove_lora
from mrgfast.peft.config import CONFIG_NAME, LoraConfig
from mrgfast.peft.state import get_lora_state, require_lora_state

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
# With bias="all", PEFT also writes the biases inside its ModulesToSaveWrapper under these parts; they repeat
# `<path>.bias` (trained) and the untouched original, so loading skips them.
PEFT_WRAPPER_PARTS = (".modules_to_save.", ".original_module.")


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's live tensors under the keys PEFT saves them with (`base_model.model.<path>...`)."""
    state = require_lora_state(model, "adapter_state_dict")
    if state.disabled_depth:
        # Inside disable_adapters the trained non-adapter weights are swapped for their frozen originals.
        raise ValueError("adapter_state_dict: called inside disable_adapters(model); leave that block first")
    tensors = {}
    for path in state.lora_paths:
        layer = model.get_submodule(path)
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = layer.lora_B.weight
        if state.config.bias == "lora_only" and layer.bias is not None:
            # PEFT keeps the wrapped nn.Linear as `base_layer`; LoRALinear holds its bias directly.
            tensors[f"{KEY_PREFIX}{path}.base_layer.bias"] = layer.bias
    for path in state.saved_paths:
        for name, tensor in model.get_submodule(path).state_dict(keep_vars=True).items():
            tensors[f"{KEY_PREFIX}{path}.{name}"] = tensor
    if state.config.bias == "all":
        lora_paths = set(state.lora_paths)
        for name, param in model.named_parameters():
            owner = name[:-len(".bias")] if name.endswith(".bias") else ("" if name == "bias" else None)
            if owner is None or any(owner == p or owner.startswith(f"{p}.") for p in state.saved_paths):
                continue
            key = f"{owner}.base_layer.bias" if owner in lora_paths else name
            tensors[f"{KEY_PREFIX}{key}"] = param
    return tensors


def replace_files(directory: Path, writers: dict[str, Callable[[str], None]]) -> None:
    """Write each file to a temp file in `directory`, then rename them all into place; on failure nothing
    that was already there is touched and the temp files are removed."""
    with contextlib.ExitStack() as stack:
        for name, write in writers.items():
            write(str(stack.enter_context(atomic_write(directory / name))))


def save_adapter(model: nn.Module, path: Union[str, Path], base_model_name_or_path: Optional[str] = None,
                 tensors: Optional[dict[str, Tensor]] = None) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` as PEFT does; returns the directory.

    `tensors` (keys as adapter_state_dict's) are written instead of the model's live ones, e.g. full copies of
    parameters that FSDP2 shards over ranks.
    """
    state = require_lora_state(model, "save_adapter")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_adapter: {directory} is a file; expected a directory to write the adapter into")
    if tensors is None:
        tensors = adapter_state_dict(model)
    else:
        tensors = checked_adapter_tensors(model, tensors, "save_adapter(tensors=...)")
    if base_model_name_or_path is None:
        base_model_name_or_path = state.config.base_model_name_or_path
    if base_model_name_or_path is None:
        # PEFT records the HF model's name_or_path; a model built from a config has "" there.
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    config = dataclasses.replace(state.config, base_model_name_or_path=base_model_name_or_path)
    return write_adapter(directory, config, tensors)


def write_adapter(path: Union[str, Path], config: LoraConfig, tensors: dict[str, Tensor]) -> Path:
    """Write `tensors` (PEFT's keys, `base_model.model.<path>.lora_A.weight` ...) and `config` as PEFT's two files,
    replacing both at once; returns the directory. For adapters that exist only as tensors (a converted checkpoint);
    save_adapter writes a model's own through it."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"write_adapter: {directory} is a file; expected a directory to write the adapter into")
    tensors = {key: t.detach().to("cpu", copy=True).contiguous() for key, t in tensors.items()}
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    replace_files(directory, {
        WEIGHTS_NAME: lambda temp: save_file(tensors, temp, metadata={"format": "pt"}),
        CONFIG_NAME: lambda temp: Path(temp).write_text(text, encoding="utf-8"),
    })
    return directory


def read_adapter_weights(directory: Path) -> tuple[Path, dict[str, Tensor]]:
    """The adapter file in `directory` and its tensors (safetensors; a legacy .bin only with weights_only)."""
    file = directory / WEIGHTS_NAME
    if file.is_file():
        try:
            return file, load_file(file, device="cpu")
        except SafetensorError as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
    file = directory / PICKLE_WEIGHTS_NAME
    if file.is_file():
        # Never unpickle arbitrary objects: weights_only accepts tensors and plain containers only.
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"{file}: refused to load, it holds more than tensors ({err})") from err
        if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
            raise ValueError(f"{file}: expected a dict of tensors")
        return file, tensors
    raise ValueError(f"{directory}: no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}) found; expected a PEFT adapter "
                     "directory as written by save_adapter or PeftModel.save_pretrained")


def check_same_lora(current: LoraConfig, loaded: LoraConfig, source: Path) -> None:
    """ValueError when the model's existing adapter would compute the loaded weights differently."""
    for name in ("r", "lora_alpha", "use_rslora", "bias"):
        if getattr(current, name) != getattr(loaded, name):
            raise ValueError(f"{source}: {name}={getattr(loaded, name)!r}, but the model's LoRA has "
                             f"{name}={getattr(current, name)!r}; load into a model without LoRA instead")


def checked_adapter_tensors(model: nn.Module, tensors: dict[str, Tensor], source) -> dict[str, Tensor]:
    """`tensors` in the model's adapter_state_dict key order (PEFT's duplicate bias copies dropped); ValueError
    naming `source` unless keys and shapes match the model's adapter exactly."""
    state = require_lora_state(model, "load_adapter")
    expected = adapter_state_dict(model)
    if state.config.bias == "all":
        tensors = {k: v for k, v in tensors.items() if not any(part in k for part in PEFT_WRAPPER_PARTS)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: the adapter's keys do not match the model; missing: [{few(missing, show=repr)}]; "
                         f"unexpected: [{few(unexpected, show=repr)}]")
    for key, target in expected.items():
        if tensors[key].shape != target.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, the model expects "
                             f"{tuple(target.shape)}")
    return {key: tensors[key] for key in expected}


def copy_into(model: nn.Module, tensors: dict[str, Tensor], file: Path) -> None:
    """Copy the file's tensors into the model's adapter, after checking keys and shapes match exactly."""
    checked = checked_adapter_tensors(model, tensors, file)
    with torch.no_grad():
        for key, target in adapter_state_dict(model).items():
            target.copy_(checked[key])


def load_adapter(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load a PEFT-format adapter directory into `model`, applying LoRA from its adapter_config.json when the
    model has none yet; keys must match exactly. Returns `model`."""
    directory = Path(path)
    config = LoraConfig.from_pretrained(directory)
    file, tensors = read_adapter_weights(directory)
    state = get_lora_state(model)
    if state is not None:
        check_same_lora(state.config, config, directory / CONFIG_NAME)
        merged = [p for p in state.lora_paths if model.get_submodule(p).merged]
        if merged:
            raise ValueError(f"load_adapter: LoRA is merged into {few(merged, 3, show=repr)}; unmerge before "
                             "loading new weights")
        copy_into(model, tensors, file)
        return model
    apply_lora(model, config)
    try:
        copy_into(model, tensors, file)
    except ValueError:
        # A file that does not fit leaves the model as it was given.
        remove_lora(model)
        raise
    return model

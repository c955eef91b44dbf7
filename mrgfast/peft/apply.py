"""apply_lora / remove_lora: swap a model's targeted nn.Linear modules for LoRALinear in place, and back."""

import dataclasses
from typing import Optional

import torch
from torch import nn

from mrgfast.common.names import few
from mrgfast.layers.lora_linear import LoRALinear
from mrgfast.peft.config import LoraConfig
from mrgfast.peft.matching import is_lora_target
from mrgfast.peft.originals import drop_originals, keep_original
from mrgfast.peft.saved_modules import find_modules_to_save
from mrgfast.peft.state import LoraState, get_lora_state, require_lora_state, set_lora_state


def check_wrappable(path: str, module: nn.Module, parent: nn.Module) -> None:
    """ValueError unless LoRALinear can stand in for the module at `path`."""
    if not isinstance(module, nn.Linear):
        raise ValueError(f"target_modules matches {path!r}, a {type(module).__name__}; mrgfast's LoRA wraps nn.Linear "
                         "only: narrow target_modules or list it in exclude_modules")
    if type(module).forward is not nn.Linear.forward:
        raise ValueError(f"target_modules matches {path!r}, a {type(module).__name__} with its own forward "
                         "(quantized or custom linear); mrgfast's LoRA wraps plain nn.Linear only")
    if isinstance(parent, nn.MultiheadAttention):
        # MultiheadAttention reads out_proj.weight directly and never calls out_proj's forward.
        raise ValueError(f"target_modules matches {path!r}, the out_proj of an nn.MultiheadAttention, which bypasses "
                         "its forward; LoRA there would have no effect")


def find_lora_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules `config` puts LoRA on; ValueError when none matches or a match is not an nn.Linear."""
    if config.target_modules is None:
        raise ValueError("LoraConfig.target_modules is not set; list the modules to adapt, e.g. ['q_proj', 'v_proj']")
    modules = dict(model.named_modules())
    targets = []
    for path, module in modules.items():
        # The root cannot be replaced in place (and PEFT's suffix rule never matches the empty path).
        if path and is_lora_target(config, path):
            check_wrappable(path, module, modules[path.rpartition(".")[0]])
            targets.append(path)
    if not targets:
        linear = [p for p, m in modules.items() if isinstance(m, nn.Linear)]
        suffixes = list(dict.fromkeys(p.rpartition(".")[2] for p in linear))
        excluded = f" after exclude_modules={config.exclude_modules!r}" if config.exclude_modules else ""
        raise ValueError(f"target_modules={config.target_modules!r} matches no module of the {type(model).__name__}"
                         f"{excluded}; its nn.Linear modules are named {few(suffixes, show=repr)} "
                         f"(e.g. {few(linear, 3, show=repr)})")
    return targets


def apply_lora(model: nn.Module, config: LoraConfig, adapter_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace the nn.Linear modules `config` targets with LoRALinear in place, each in the train/eval mode of the
    layer it replaces; only adapter weights (plus modules_to_save and the biases `config.bias` names) stay
    trainable. Returns `model`."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"apply_lora needs a torch nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise ValueError(f"apply_lora needs a mrgfast.peft.LoraConfig, got {type(config).__name__}")
    applied = [path for path, m in model.named_modules() if isinstance(m, LoRALinear)]
    if get_lora_state(model) is not None or applied:
        where = f" (LoRALinear at {few(applied, 3, show=repr)})" if applied else ""
        raise ValueError(f"apply_lora: LoRA is already applied to this {type(model).__name__}{where}; "
                         "call remove_lora(model) first or load_adapter into the adapted model")
    # Find everything before changing anything, so a bad config leaves the model untouched.
    saved_paths = find_modules_to_save(model, config.modules_to_save)
    lora_paths = find_lora_targets(model, config)
    requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    for path in lora_paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        original = getattr(parent, child)
        layer = LoRALinear(original, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           use_rslora=config.use_rslora, adapter_dtype=adapter_dtype)
        # A new module starts in train mode; it takes the mode of the layer it replaces, so an eval-mode model
        # (load_adapter into it, as PEFT's from_pretrained gives) gets no LoRA dropout until .train() is called.
        layer.train(original.training)
        setattr(parent, child, layer)
    set_lora_state(model, LoraState(dataclasses.replace(config), lora_paths, saved_paths, requires_grad_before))
    mark_trainable(model)
    keep_trained_originals(model)
    return model


def mark_trainable(model: nn.Module) -> None:
    """Freeze everything except the adapters, the modules to save and the biases named by config.bias (as PEFT)."""
    state = require_lora_state(model, "mark_trainable")
    for param in model.parameters():
        param.requires_grad_(False)
    for path in state.lora_paths:
        layer = model.get_submodule(path)
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
        if state.config.bias == "lora_only" and layer.bias is not None:
            layer.bias.requires_grad_(True)
    for path in state.saved_paths:
        for param in model.get_submodule(path).parameters():
            param.requires_grad_(True)
    if state.config.bias == "all":
        for name, param in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                param.requires_grad_(True)


def keep_trained_originals(model: nn.Module) -> None:
    """Keep a frozen copy of every trainable non-adapter parameter (modules_to_save, biases) for disable_adapters."""
    state = require_lora_state(model, "keep_trained_originals")
    seen = set()
    for path in state.lora_paths:
        layer = model.get_submodule(path)
        seen.update((id(layer.lora_A.weight), id(layer.lora_B.weight)))
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                keep_original(module, name)


def remove_lora(model: nn.Module) -> nn.Module:
    """Undo apply_lora: plain nn.Linear modules back (merged adapters are unmerged first), adapters dropped,
    requires_grad as before. modules_to_save and trained biases keep their current values. Returns `model`."""
    state = require_lora_state(model, "remove_lora")
    if state.disabled_depth:
        raise ValueError("remove_lora: called inside disable_adapters(model); leave that block first")
    for path in state.lora_paths:
        layer = model.get_submodule(path)
        if layer.merged:
            layer.unmerge()
        # Built on the meta device so no storage is allocated; the real Parameters are then put in.
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = layer.weight
        linear.bias = layer.bias
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, linear)
    drop_originals(model)
    for name, param in model.named_parameters():
        if name in state.requires_grad_before:
            param.requires_grad_(state.requires_grad_before[name])
    set_lora_state(model, None)
    return model

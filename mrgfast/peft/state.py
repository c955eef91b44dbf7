"""The record apply_lora leaves on a model: its config and which modules it changed."""

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from mrgfast.peft.config import LoraConfig

STATE_ATTR = "_mrgfast_lora"


@dataclass
class LoraState:
    """What apply_lora did to a model; save/load/disable read it instead of guessing from module names."""

    config: LoraConfig
    lora_paths: list[str]
    saved_paths: list[str]
    requires_grad_before: dict[str, bool] = field(default_factory=dict)
    disabled_depth: int = 0


def get_lora_state(model: nn.Module) -> Optional[LoraState]:
    """The LoraState apply_lora attached to `model`, or None if LoRA was never applied."""
    return model.__dict__.get(STATE_ATTR)


def set_lora_state(model: nn.Module, state: Optional[LoraState]) -> None:
    """Attach (or with None, remove) the LoraState of `model`."""
    if state is None:
        model.__dict__.pop(STATE_ATTR, None)
    else:
        # A plain attribute, not a submodule or buffer: it must not appear in state_dict or named_modules.
        model.__dict__[STATE_ATTR] = state


def require_lora_state(model: nn.Module, action: str) -> LoraState:
    """The model's LoraState; ValueError naming `action` when LoRA has not been applied."""
    state = get_lora_state(model)
    if state is None:
        raise ValueError(f"{action}: the model has no LoRA adapter (no mrgfast.peft.apply_lora or load_adapter "
                         f"was run on this {type(model).__name__})")
    return state


def get_lora_config(model: nn.Module) -> LoraConfig:
    """The LoraConfig applied to `model` (target_modules as given, base_model_name_or_path as known)."""
    return require_lora_state(model, "get_lora_config").config

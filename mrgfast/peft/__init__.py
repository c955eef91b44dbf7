"""LoRA in PEFT's format: LoraConfig, apply_lora, disable_adapters and adapter save/load."""

from mrgfast.peft.adapter_io import adapter_state_dict, load_adapter, save_adapter, write_adapter
from mrgfast.peft.apply import apply_lora, remove_lora
from mrgfast.peft.config import LoraConfig
from mrgfast.peft.disable import disable_adapters
from mrgfast.peft.state import get_lora_config

__all__ = ["LoraConfig", "adapter_state_dict", "apply_lora", "disable_adapters", "get_lora_config",
           "load_adapter", "remove_lora", "save_adapter", "write_adapter"]

"""Drop-in nn.Modules built on mrgfast ops."""

from mrgfast.layers.lora_linear import LoRALinear

__all__ = ["LoRALinear"]

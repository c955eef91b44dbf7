"""Fused ops: each has a public function, a pure-PyTorch reference and per-backend kernels."""

from mrgfast.ops.lora_linear import lora_linear, reference_lora_linear
from mrgfast.ops.lora_qkv import lora_qkv_linear, reference_lora_qkv_linear

__all__ = ["lora_linear", "reference_lora_linear", "lora_qkv_linear", "reference_lora_qkv_linear"]

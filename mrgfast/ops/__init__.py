"""Fused ops: each has a public function, a pure-PyTorch reference and per-backend kernels."""

from mrgfast.ops.lora_linear import lora_linear, reference_lora_linear

__all__ = ["lora_linear", "reference_lora_linear"]

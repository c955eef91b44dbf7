"""Fused ops: each has a public function, a pure-PyTorch reference and per-backend kernels."""

from mrgfast.ops.linear_cross_entropy import (
    check_labels, linear_cross_entropy, linear_logprobs, reference_logprobs, reference_token_losses,
)
from mrgfast.ops.lora_linear import lora_linear, reference_lora_linear
from mrgfast.ops.lora_qkv import lora_qkv_linear, reference_lora_qkv_linear
from mrgfast.ops.sequence_logprobs import sequence_logprobs, sequence_token_counts

__all__ = [
    "lora_linear", "reference_lora_linear", "lora_qkv_linear", "reference_lora_qkv_linear",
    "linear_cross_entropy", "linear_logprobs", "reference_logprobs", "reference_token_losses", "check_labels",
    "sequence_logprobs", "sequence_token_counts",
]

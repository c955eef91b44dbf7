"""Fused ops: ops/<op>.py has the public function, reference, autograd and dispatch to ops/backends/<kind>/<op>.py."""

from mrgfast.ops.affine_prompt import affine_prompt, reference_affine_prompt
from mrgfast.ops.group_tokens import GroupLayout, group_layout, group_tokens, reference_group_tokens
from mrgfast.ops.grouped_projection import grouped_projection, reference_grouped_projection
from mrgfast.ops.linear_cross_entropy import (
    check_labels, linear_cross_entropy, linear_logprobs, reference_logprobs, reference_token_losses,
)
from mrgfast.ops.lora_linear import lora_linear, reference_lora_linear
from mrgfast.ops.lora_qkv import lora_qkv_linear, reference_lora_qkv_linear
from mrgfast.ops.sequence_logprobs import sequence_logprobs, sequence_token_counts

__all__ = [
    "affine_prompt", "reference_affine_prompt",
    "group_tokens", "group_layout", "GroupLayout", "reference_group_tokens", "grouped_projection",
    "reference_grouped_projection",
    "lora_linear", "reference_lora_linear", "lora_qkv_linear", "reference_lora_qkv_linear",
    "linear_cross_entropy", "linear_logprobs", "reference_logprobs", "reference_token_losses", "check_labels",
    "sequence_logprobs", "sequence_token_counts",
]

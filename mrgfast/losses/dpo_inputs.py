"""The rows of packed hidden states that DPO scores: gathered once, P chosen then P rejected answers."""

from typing import Optional

from torch import Tensor

from mrgfast.ops.linear_cross_entropy import linear_logprobs
from mrgfast.ops.sequence_logprobs import sequence_logprobs


def dpo_loss_inputs(hidden: Tensor, index: Tensor, labels: Tensor, cu_seqlens: Tensor,
                    ref_hidden: Optional[Tensor] = None) -> dict:
    """Keyword arguments of fused_dpo_loss (hidden, labels, cu_seqlens[, ref_hidden]) from packed hidden states.

    `hidden` [..., D] is the decoder's output on a DPO batch; `index` holds the flat positions scoring each answer
    token (in the shared layout the prompt's last position scores both answers' first tokens), `labels` those
    tokens and `cu_seqlens` the 2P answer bounds, P chosen then P rejected, as fused_dpo_loss expects
    (PackedBatch.dpo_targets gives all three).
    """
    out = dict(hidden=hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), labels=labels,
               cu_seqlens=cu_seqlens)
    if ref_hidden is not None:
        if ref_hidden.shape != hidden.shape:
            raise ValueError(f"ref_hidden must have hidden's shape {tuple(hidden.shape)}, "
                             f"got {tuple(ref_hidden.shape)}")
        out["ref_hidden"] = ref_hidden.reshape(-1, ref_hidden.shape[-1]).index_select(0, index)
    return out


def dpo_sequence_logps(hidden: Tensor, index: Tensor, labels: Tensor, cu_seqlens: Tensor, weight: Tensor,
                       bias: Optional[Tensor] = None) -> tuple:
    """(chosen [P], rejected [P]) summed answer log-probs from packed hidden states, without full logits (e.g. to
    precompute reference log-probs for fused_dpo_loss's ref_logps)."""
    inputs = dpo_loss_inputs(hidden, index, labels, cu_seqlens)
    token_logps = linear_logprobs(inputs["hidden"], weight, inputs["labels"], bias)
    logps = sequence_logprobs(token_logps, inputs["cu_seqlens"])
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]

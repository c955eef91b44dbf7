"""DPO loss straight from the final hidden states of packed chosen/rejected sequences, without logits."""

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from mrgfast.losses.dpo import check_dpo_args, dpo_loss
from mrgfast.ops.linear_cross_entropy import linear_logprobs
from mrgfast.ops.sequence_logprobs import check_cu_seqlens, sequence_logprobs


def count_pairs(cu_seqlens: Tensor) -> int:
    """Number of chosen/rejected pairs P in a packing of 2P sequences; ValueError if the count is odd."""
    check_cu_seqlens(cu_seqlens)
    num_sequences = cu_seqlens.shape[0] - 1
    if num_sequences == 0 or num_sequences % 2:
        raise ValueError(f"chosen/rejected count mismatch: cu_seqlens packs {num_sequences} sequences, expected "
                         "2P > 0 (P chosen, then the P rejected in the same order)")
    return num_sequences // 2


def split_ref_logps(ref_logps: Union[Tensor, Sequence[Tensor]], num_pairs: int) -> Tuple[Tensor, Tensor]:
    """Precomputed reference log-probs, [2P] or (chosen [P], rejected [P]), as two detached [P] tensors."""
    if isinstance(ref_logps, Tensor):
        if tuple(ref_logps.shape) != (2 * num_pairs,):
            raise ValueError(f"ref_logps must be [2P] = [{2 * num_pairs}] (chosen then rejected), "
                             f"got shape {tuple(ref_logps.shape)}")
        chosen, rejected = ref_logps[:num_pairs], ref_logps[num_pairs:]
    elif isinstance(ref_logps, (tuple, list)) and len(ref_logps) == 2:
        chosen, rejected = ref_logps
        for name, part in (("ref_logps[0] (chosen)", chosen), ("ref_logps[1] (rejected)", rejected)):
            if not isinstance(part, Tensor) or tuple(part.shape) != (num_pairs,):
                shape = tuple(part.shape) if isinstance(part, Tensor) else type(part).__name__
                raise ValueError(f"chosen/rejected count mismatch: {name} must be [P] = [{num_pairs}], got {shape}")
    else:
        raise ValueError("ref_logps must be a [2P] tensor or a (chosen [P], rejected [P]) pair of tensors, "
                         f"got {type(ref_logps).__name__}")
    # The reference is a constant of the DPO objective: no gradient may reach whatever produced it.
    return chosen.detach(), rejected.detach()


def reference_sequence_logps(ref_hidden: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                             labels: Tensor, cu_seqlens: Tensor, token_mask: Tensor, ignore_index: int) -> Tensor:
    """Per-sequence summed reference log-probs [2P] from reference hidden states, computed without grad."""
    if tuple(ref_hidden.shape) != tuple(hidden.shape):
        raise ValueError(f"ref_hidden must have hidden's shape {tuple(hidden.shape)} (same packing), "
                         f"got {tuple(ref_hidden.shape)}")
    with torch.no_grad():
        # Detached inputs also tell the fused head not to form gradients in its forward pass.
        token_logps = linear_logprobs(ref_hidden.detach(), weight.detach(), labels,
                                      None if bias is None else bias.detach(), ignore_index)
        return sequence_logprobs(token_logps, cu_seqlens, token_mask=token_mask)


def fused_dpo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, cu_seqlens: Tensor, *,
                   bias: Optional[Tensor] = None, ref_logps: Union[Tensor, Sequence[Tensor], None] = None,
                   ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                   ref_bias: Optional[Tensor] = None, beta=0.1, loss_type: Union[str, Sequence[str]] = "sigmoid",
                   label_smoothing: float = 0.0, loss_weights: Optional[Sequence[float]] = None,
                   ignore_index: int = -100, validate: bool = False,
                   pair_mask: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """DPO loss and TRL's metrics from packed hidden states [N, D], never building the [N, vocab] logits.

    `cu_seqlens` [2P+1] packs P chosen sequences then the P rejected ones (TRL's concatenated order);
    `labels` [N] are already shifted, with prompt tokens at ignore_index. Each sequence's log-prob is
    the sum over its labelled tokens (TRL's; "ipo" then averages over them, as TRL does). The reference
    comes either precomputed (`ref_logps`: [2P] or (chosen [P], rejected [P]) summed log-probs) or as
    reference hidden states `ref_hidden` with the same packing, read through `ref_weight` / `ref_bias`
    (each defaulting to the policy's) under no_grad. loss_type / loss_weights as losses.dpo.dpo_loss (a list with
    "sft" is RPO). `pair_mask` [P] (bool) leaves a static batch's padded pair slots (empty sequences) out of the
    loss and the metrics. Sync-free unless `validate=True`.
    """
    if (ref_logps is None) == (ref_hidden is None):
        raise ValueError("pass exactly one of ref_logps (precomputed reference log-probs) or ref_hidden "
                         "(reference hidden states)")
    if ref_logps is not None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight/ref_bias are only used with ref_hidden; with ref_logps leave them None")
    # Argument errors first: they should not wait for a pass over the vocabulary.
    check_dpo_args(loss_type, beta, label_smoothing, loss_weights)
    num_pairs = count_pairs(cu_seqlens)
    token_mask = labels != ignore_index
    token_logps = linear_logprobs(hidden, weight, labels, bias, ignore_index, validate)
    policy_logps, counts = sequence_logprobs(token_logps, cu_seqlens, token_mask=token_mask, validate=validate,
                                             return_counts=True)
    if ref_logps is not None:
        ref_chosen, ref_rejected = split_ref_logps(ref_logps, num_pairs)
    else:
        head_weight = weight if ref_weight is None else ref_weight
        head_bias = bias if ref_bias is None else ref_bias
        ref_all = reference_sequence_logps(ref_hidden, hidden, head_weight, head_bias, labels, cu_seqlens,
                                           token_mask, ignore_index)
        ref_chosen, ref_rejected = ref_all[:num_pairs], ref_all[num_pairs:]
    return dpo_loss(policy_logps[:num_pairs], policy_logps[num_pairs:], ref_chosen, ref_rejected, beta=beta,
                    loss_type=loss_type, label_smoothing=label_smoothing, chosen_lengths=counts[:num_pairs],
                    rejected_lengths=counts[num_pairs:], loss_weights=loss_weights, pair_mask=pair_mask)

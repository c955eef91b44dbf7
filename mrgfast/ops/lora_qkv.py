"""Fused LoRA for projections that share an input (q, k, v): one pass over x, one dX accumulation."""

from typing import Optional, Sequence

import torch
from torch import Tensor

from mrgfast.ops.lora_linear import lora_linear, reference_lora_linear


def check_qkv_args(weight: Tensor, bias: Optional[Tensor], lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor],
                   scalings: Sequence[float]) -> list[int]:
    """Validate the per-projection adapters against the fused weight; return each projection's out size."""
    if not (len(lora_as) == len(lora_bs) == len(scalings)) or not lora_as:
        raise ValueError(f"lora_as, lora_bs and scalings need one entry per projection, got "
                         f"{len(lora_as)}, {len(lora_bs)}, {len(scalings)}")
    out_sizes = [b.shape[0] for b in lora_bs]
    if weight.dim() != 2 or sum(out_sizes) != weight.shape[0]:
        raise ValueError(f"weight must be [sum of projection outs = {sum(out_sizes)}, in], got {tuple(weight.shape)}")
    for index, (a, b) in enumerate(zip(lora_as, lora_bs)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != weight.shape[1] or b.shape[1] != a.shape[0]:
            raise ValueError(f"projection {index}: lora_a must be [r, {weight.shape[1]}] and lora_b [out, r], "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
    return out_sizes


def lora_qkv_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_as: Sequence[Tensor],
                    lora_bs: Sequence[Tensor], scalings: Sequence[float], dropout_p: float = 0.0,
                    training: bool = False, seed: Optional[int] = None) -> tuple[Tensor, ...]:
    """q, k, v (any projections sharing x) from the fused base weight [sum(out_i), in] and per-projection LoRA.

    The adapters become one LoRA pair: A stacked [sum(r_i), in] and a block-diagonal B whose blocks carry
    each projection's scaling, so the fused kernel reads x once and accumulates dX once. The projections
    share one dropout mask of x (PEFT draws one per projection; both are unbiased dropout of the input).
    """
    out_sizes = check_qkv_args(weight, bias, lora_as, lora_bs, scalings)
    # In the adapters' own dtype (fp32 beside a bf16 base, as PEFT keeps them): lora_linear computes in x's dtype
    # and returns the adapters' gradients in theirs (the split design accumulates them in fp32).
    stacked_a = torch.cat(list(lora_as))
    block_b = torch.block_diag(*[b * float(s) for b, s in zip(lora_bs, scalings)])
    y = lora_linear(x, weight, bias, stacked_a, block_b, 1.0, dropout_p, training, seed)
    return tuple(y.split(out_sizes, dim=-1))


def reference_lora_qkv_linear(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                              lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor], scalings: Sequence[float],
                              keep_mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> tuple[Tensor, ...]:
    """Separate eager LoRA projections, sharing one dropout keep mask, as the fused op computes them."""
    return tuple(reference_lora_linear(x, w, b, a, bb, s, keep_mask, dropout_p)
                 for w, b, a, bb, s in zip(weights, biases, lora_as, lora_bs, scalings))

"""Per-sequence sums or means of packed per-token log-probs (flash-attn varlen packing), sync-free."""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor


def flatten_token_logps(token_logps: Tensor) -> Tensor:
    """token_logps as [N]: accepts [N] or a packed batch of one [1, N]; ValueError otherwise."""
    if not token_logps.is_floating_point():
        raise ValueError(f"token_logps must be a floating tensor, got {token_logps.dtype}")
    if token_logps.dim() == 2 and token_logps.shape[0] == 1:
        return token_logps.reshape(-1)
    if token_logps.dim() != 1:
        raise ValueError(f"token_logps must be [N] or [1, N] (packed tokens), got shape {tuple(token_logps.shape)}")
    return token_logps


def check_cu_seqlens(cu_seqlens: Tensor, device: Optional[torch.device] = None) -> None:
    """Raise ValueError if cu_seqlens is not a 1-D int32/int64 tensor [S+1] (shape/dtype only: no sync)."""
    if not isinstance(cu_seqlens, Tensor):
        raise ValueError(f"cu_seqlens must be a tensor of sequence boundaries, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [num_sequences + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if device is not None and cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but token_logps is on {device}")


def check_token_mask(token_mask: Optional[Tensor], n_tokens: int) -> Optional[Tensor]:
    """token_mask flattened to [N] bool, or None; ValueError if its shape or dtype does not fit."""
    if token_mask is None:
        return None
    if token_mask.dtype != torch.bool:
        raise ValueError(f"token_mask must be a bool tensor, got {token_mask.dtype}")
    if token_mask.numel() != n_tokens or token_mask.dim() not in (1, 2) or (
            token_mask.dim() == 2 and token_mask.shape[0] != 1):
        raise ValueError(f"token_mask must be [N] or [1, N] with N={n_tokens}, got shape {tuple(token_mask.shape)}")
    return token_mask.reshape(-1)


def validate_cu_seqlens(cu_seqlens: Tensor, n_tokens: int) -> None:
    """Raise ValueError unless cu_seqlens starts at 0, never decreases and ends at n_tokens (synchronises)."""
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if last != n_tokens:
        raise ValueError(f"cu_seqlens must end at the number of tokens N={n_tokens}, got {last}")
    if cu_seqlens.numel() > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")


def token_segment_ids(cu_seqlens: Tensor, n_tokens: int) -> Tensor:
    """Sequence index [N] int64 of every packed token: the number of sequence ends at or before it."""
    positions = torch.arange(n_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    # right=True puts a token at a boundary into the next sequence and steps over empty sequences; tokens past
    # cu_seqlens[-1] land in index S, a spill bin the callers drop, so bad input cannot index out of bounds.
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def segment_sums(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Sum of values [N] per segment [num_segments]; ids equal to num_segments (the spill bin) are dropped."""
    out = values.new_zeros(num_segments + 1)
    return out.index_add(0, segment_ids, values)[:num_segments]


def sequence_token_counts(cu_seqlens: Tensor, token_mask: Optional[Tensor] = None,
                          validate: bool = False) -> Tensor:
    """Counted tokens per sequence [S] int64: the span length, or the number of True entries of token_mask."""
    check_cu_seqlens(cu_seqlens)
    num_sequences = cu_seqlens.shape[0] - 1
    if token_mask is None:
        if validate:
            validate_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]))
        return (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    mask = check_token_mask(token_mask, token_mask.numel())
    if mask.device != cu_seqlens.device:
        raise ValueError(f"token_mask is on {mask.device} but cu_seqlens is on {cu_seqlens.device}")
    if validate:
        validate_cu_seqlens(cu_seqlens, mask.numel())
    segment_ids = token_segment_ids(cu_seqlens, mask.numel())
    return segment_sums(mask.long(), segment_ids, num_sequences)


def sequence_logprobs(token_logps: Tensor, cu_seqlens: Tensor, average: bool = False,
                      token_mask: Optional[Tensor] = None, validate: bool = False,
                      return_counts: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per-sequence sums [S] (or means over counted tokens) of packed per-token log-probs; differentiable.

    `cu_seqlens` [S+1] holds the sequence boundaries as flash-attn's varlen API does. Counted tokens are
    those where `token_mask` is True (every token when it is None); uncounted tokens add nothing to the sum,
    and a sequence with no counted token gets 0 (never NaN). The result is at least fp32. Shapes come from
    the tensors' shapes only, so the call never synchronises with the device and can be captured in a CUDA
    graph; `validate=True` adds the boundary checks that need the values (and so a sync).
    With `return_counts=True` it returns (values, counts [S] int64).
    """
    logps = flatten_token_logps(token_logps)
    check_cu_seqlens(cu_seqlens, logps.device)
    n_tokens, num_sequences = logps.shape[0], cu_seqlens.shape[0] - 1
    mask = check_token_mask(token_mask, n_tokens)
    if mask is not None and mask.device != logps.device:
        raise ValueError(f"token_mask is on {mask.device} but token_logps is on {logps.device}")
    if validate:
        validate_cu_seqlens(cu_seqlens, n_tokens)
    # Accumulate in fp32 at least: bf16 sums over hundreds of tokens lose the digits DPO margins live in.
    logps = logps.to(torch.promote_types(logps.dtype, torch.float32))
    if mask is not None:
        # where, not multiply: a masked position holding inf/NaN must not poison its sequence.
        logps = torch.where(mask, logps, torch.zeros_like(logps))
    segment_ids = token_segment_ids(cu_seqlens, n_tokens)
    sums = segment_sums(logps, segment_ids, num_sequences)
    need_counts = average or return_counts
    if need_counts:
        if mask is None:
            counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        else:
            counts = segment_sums(mask.long(), segment_ids, num_sequences)
    values = sums / counts.clamp_min(1).to(sums.dtype) if average else sums
    return (values, counts) if return_counts else values


def reference_sequence_logprobs(token_logps: Tensor, cu_seqlens: Tensor, average: bool = False,
                                token_mask: Optional[Tensor] = None) -> Tensor:
    """Per-sequence sums or means by a Python loop over slices (the oracle; synchronises)."""
    logps = token_logps.reshape(-1).to(torch.promote_types(token_logps.dtype, torch.float32))
    mask = None if token_mask is None else token_mask.reshape(-1)
    bounds = cu_seqlens.tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        span = logps[start:end]
        if mask is not None:
            span = span[mask[start:end]]
        total = span.sum()
        out.append(total / span.numel() if average and span.numel() > 0 else total)
    if not out:
        return logps.new_zeros(0)
    return torch.stack(out)

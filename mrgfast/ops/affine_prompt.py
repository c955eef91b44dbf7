"""Conditional affine prompt modulation (MRG-LLM): out = (sum_k w_k P_k) * (1 + gamma) + beta, fused.

Prompt-wise: prompts P [L, D], no weights. Promptbook-wise: a bank P [K, L, D] mixed per image by weights
w [B, K]. gamma and beta are [B, D] (one modulation per image) or [B, L, D] (one per prompt token). The
mixed prompt is never materialised: forward and backward recompute it on the fly. With `out` [B, T, D] (the
LLM's input-embedding buffer) the prompts are written in place at rows offsets[b] .. offsets[b] + L - 1,
which saves the torch.cat that would otherwise build the embedding sequence.
"""

from typing import Optional, Union

import torch
from torch import Tensor

from mrgfast.ops.backend import select_backend
from mrgfast.ops.backends.native import affine_prompt as native_kernels

IMPLEMENTED = ("cpu", "triton", "cuda")
OffsetsLike = Union[int, Tensor, None]


def kernels(backend: str):
    """The kernels of `backend`: native (C++ or CUDA by device), or Triton's, imported here as triton is optional."""
    if backend == "triton":
        from mrgfast.ops.backends.triton import affine_prompt as triton_kernels
        return triton_kernels
    return native_kernels


def reference_mixed_prompts(prompts: Tensor, weights: Optional[Tensor]) -> Tensor:
    """The prompt each image starts from: P [L, D] itself, or the weighted bank sum_k w[b, k] P[k] [B, L, D]."""
    if weights is None:
        return prompts
    return torch.einsum("bk,kld->bld", weights, prompts)


def reference_affine_prompt(prompts: Tensor, gamma: Tensor, beta: Tensor, weights: Optional[Tensor] = None,
                            out: Optional[Tensor] = None, offsets: OffsetsLike = None) -> Tensor:
    """Eager, out-of-place oracle: the [B, L, D] prompts, or a copy of `out` with the prompt rows replaced."""
    mixed = reference_mixed_prompts(prompts, weights)
    if gamma.dim() == 2:  # one modulation per image, shared by its L prompt tokens
        gamma, beta = gamma[:, None, :], beta[:, None, :]
    result = mixed * (1 + gamma) + beta
    if out is None:
        return result
    batch_index, row_index = prompt_rows(offsets_tensor(offsets, out.shape[0], out.device), result.shape[1])
    return out.index_put((batch_index, row_index), result)


def prompt_rows(offsets: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Index tensors ([B, L] each) of the rows of a [B, T, D] buffer that the L prompts of each sample fill."""
    rows = offsets.to(torch.long)[:, None] + torch.arange(length, device=offsets.device)
    return torch.arange(offsets.shape[0], device=offsets.device)[:, None].expand_as(rows), rows


def offsets_tensor(offsets: OffsetsLike, batch: int, device: torch.device) -> Tensor:
    """Offsets as an int64 [B] tensor on `device` (an int is every sample's offset; None means 0)."""
    if offsets is None:
        offsets = 0
    if isinstance(offsets, Tensor):
        return offsets.to(device=device, dtype=torch.long).contiguous()
    return torch.full((batch,), int(offsets), dtype=torch.long, device=device)


def check_affine_args(prompts: Tensor, gamma: Tensor, beta: Tensor, weights: Optional[Tensor],
                      out: Optional[Tensor], offsets: OffsetsLike) -> None:
    """Raise ValueError naming the argument whose shape, dtype, device or value is wrong."""
    if prompts.dim() not in (2, 3):
        raise ValueError(f"prompts must be [L, D] (prompt-wise) or [K, L, D] (a promptbook), "
                         f"got shape {tuple(prompts.shape)}")
    length, dim = prompts.shape[-2:]
    if gamma.dim() not in (2, 3):
        raise ValueError(f"gamma must be [B, D] or [B, L, D], got shape {tuple(gamma.shape)}")
    batch = gamma.shape[0]
    expected = (batch, dim) if gamma.dim() == 2 else (batch, length, dim)
    if tuple(gamma.shape) != expected:
        raise ValueError(f"gamma must be [B, D] or [B, L, D] with L={length}, D={dim} (from prompts), "
                         f"got shape {tuple(gamma.shape)}")
    if tuple(beta.shape) != tuple(gamma.shape):
        raise ValueError(f"beta must have gamma's shape {tuple(gamma.shape)}, got {tuple(beta.shape)}")
    if prompts.dim() == 3 and weights is None:
        raise ValueError(f"weights [B, K] are required for a promptbook (prompts is [K, L, D] = "
                         f"{tuple(prompts.shape)})")
    if prompts.dim() == 2 and weights is not None:
        raise ValueError("weights given, but prompts is [L, D]: a promptbook to mix is [K, L, D]")
    if weights is not None and tuple(weights.shape) != (batch, prompts.shape[0]):
        raise ValueError(f"weights must be [B, K] = [{batch}, {prompts.shape[0]}] (B from gamma, K from prompts), "
                         f"got shape {tuple(weights.shape)}")
    named = [("prompts", prompts), ("gamma", gamma), ("beta", beta), ("weights", weights), ("out", out)]
    for name, tensor in named[1:]:
        if tensor is None:
            continue
        if tensor.dtype != prompts.dtype:
            raise ValueError(f"{name} ({tensor.dtype}) must have prompts' dtype ({prompts.dtype})")
        if tensor.device != prompts.device:
            raise ValueError(f"{name} is on {tensor.device}, prompts on {prompts.device}: all must share a device")
    if out is None:
        if offsets is not None:
            raise ValueError("offsets given without out: offsets place the prompts inside the out buffer")
        return
    check_out(out, offsets, batch, length, dim)


def check_out(out: Tensor, offsets: OffsetsLike, batch: int, length: int, dim: int) -> None:
    """Raise ValueError unless out is a contiguous [B, T, D] buffer and every offsets[b] + L fits in T."""
    if out.dim() != 3 or out.shape[0] != batch or out.shape[2] != dim:
        raise ValueError(f"out must be [B, T, D] with B={batch}, D={dim}, got shape {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous (it is written in place), got strides {out.stride()}")
    rows = out.shape[1]
    if isinstance(offsets, Tensor):
        if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
            raise ValueError(f"offsets must be an integer tensor, got {offsets.dtype}")
        if tuple(offsets.shape) != (batch,):
            raise ValueError(f"offsets must be an int or a [B] = [{batch}] tensor, got shape {tuple(offsets.shape)}")
        low, high = (int(offsets.min()), int(offsets.max())) if batch else (0, 0)
    elif offsets is None or (isinstance(offsets, int) and not isinstance(offsets, bool)):
        low = high = int(offsets or 0)
    else:
        raise ValueError(f"offsets must be an int or a [B] integer tensor, got {type(offsets).__name__}")
    if low < 0 or high + length > rows:
        raise ValueError(f"offsets must keep the L={length} prompt rows inside out's T={rows} rows "
                         f"(0 <= offsets[b] <= {rows - length}), got offsets in [{low}, {high}]")


def routing_case(book: bool, in_place: bool) -> str:
    """The op's case in mrgfast.ops.routing: prompt-wise or a promptbook, a new tensor or written into `out`."""
    return f"{'book' if book else 'prompt'}_{'out' if in_place else 'new'}"


def affine_prompt(prompts: Tensor, gamma: Tensor, beta: Tensor, weights: Optional[Tensor] = None,
                  out: Optional[Tensor] = None, offsets: OffsetsLike = None) -> Tensor:
    """(sum_k w_k P_k) * (1 + gamma) + beta as [B, L, D], or written into out [B, T, D] at offsets (returned)."""
    check_affine_args(prompts, gamma, beta, weights, out, offsets)
    backend = select_backend("affine_prompt", prompts, IMPLEMENTED, routing_case(weights is not None, out is not None),
                             gamma.shape[0] * prompts.shape[-2] * prompts.shape[-1])
    if backend == "reference":
        result = reference_affine_prompt(prompts, gamma, beta, weights)
        if out is None:
            return result
        # In place, as the fused backends do, so callers see one behaviour whatever the backend.
        batch_index, row_index = prompt_rows(offsets_tensor(offsets, out.shape[0], out.device), result.shape[1])
        return out.index_put_((batch_index, row_index), result)
    offsets = None if out is None else offsets_tensor(offsets, out.shape[0], out.device)
    return AffinePromptFunction.apply(prompts.contiguous(), gamma.contiguous(), beta.contiguous(),
                                      None if weights is None else weights.contiguous(), out, offsets, backend)


class AffinePromptFunction(torch.autograd.Function):
    """Autograd for the fused op; saves P, gamma and w (never the mixed prompt or the output)."""

    @staticmethod
    def forward(ctx, prompts, gamma, beta, weights, out, offsets, backend):
        length, dim = prompts.shape[-2:]
        in_place = out is not None
        if not in_place:
            out = torch.empty((gamma.shape[0], length, dim), dtype=prompts.dtype, device=prompts.device)
        if out.numel():
            kernels(backend).affine_forward(prompts, gamma, beta, weights, out, offsets)
        if in_place:
            ctx.mark_dirty(out)
        ctx.save_for_backward(prompts, gamma, weights, offsets)
        ctx.backend = backend
        ctx.in_place = in_place
        return out

    @staticmethod
    def backward(ctx, grad_out):
        prompts, gamma, weights, offsets = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grads = affine_grads(ctx.backend, grad_out, prompts, gamma, weights, offsets, needs[:4])
        grad_buffer = None
        if ctx.in_place and needs[4]:
            # The prompt rows overwrote what `out` held there, so that earlier content gets no gradient.
            batch_index, row_index = prompt_rows(offsets, prompts.shape[-2])
            grad_buffer = grad_out.index_put((batch_index, row_index), grad_out.new_zeros(()))
        return (*grads, grad_buffer, None, None)


def affine_grads(backend: str, grad_out: Tensor, prompts: Tensor, gamma: Tensor, weights: Optional[Tensor],
                 offsets: Optional[Tensor], needs) -> tuple:
    """(dP, dgamma, dbeta, dw), None where not needed; zeros without a kernel call when there is nothing to sum."""
    need_p, need_gamma, need_beta, need_w = needs
    need_w = need_w and weights is not None
    if not any((need_p, need_gamma, need_beta, need_w)):
        return None, None, None, None
    batch, (length, dim) = gamma.shape[0], prompts.shape[-2:]
    if batch * length * dim == 0:
        zeros = lambda t, need: torch.zeros_like(t) if need else None  # noqa: E731
        return zeros(prompts, need_p), zeros(gamma, need_gamma), zeros(gamma, need_beta), zeros(weights, need_w)
    return kernels(backend).affine_backward(
        grad_out, prompts, gamma, weights, offsets,
        need_prompts=need_p, need_gamma=need_gamma, need_beta=need_beta, need_weights=need_w)

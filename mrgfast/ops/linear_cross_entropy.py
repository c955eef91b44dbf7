"""Fused LM-head cross-entropy and per-token log-probs that never materialise the [tokens, vocab] logits."""

from typing import Optional, Union

import torch
from torch import Tensor

from mrgfast.ops.backend import select_backend
from mrgfast.ops.backends.torch import linear_cross_entropy as torch_kernels

IMPLEMENTED = ("cpu", "triton")
REDUCTIONS = ("mean", "sum", "none")


def kernels(backend: str):
    """The kernels of `backend`: fused torch ("cpu"), or Triton's, imported here as triton is optional."""
    if backend == "triton":
        from mrgfast.ops.backends.triton import linear_cross_entropy as triton_kernels
        return triton_kernels
    return torch_kernels


def reference_token_losses(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                           ignore_index: int = -100, label_smoothing: float = 0.0) -> Tensor:
    """Per-token cross-entropy [N] in fp32 from the full logits (the oracle); 0 at ignored positions."""
    logits = torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none",
                                             label_smoothing=label_smoothing)


def check_head_args(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
                    label_smoothing: float) -> None:
    """Raise ValueError naming the argument whose shape or value is wrong (no host synchronisation)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must end in hidden_size={weight.shape[1]} (weight is [vocab, hidden]), "
                         f"got shape {tuple(hidden.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32 token ids, got {labels.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [vocab] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def check_labels(labels: Tensor, vocab_size: int, ignore_index: int = -100) -> None:
    """Raise ValueError if a label is outside [0, vocab_size) and not ignore_index (synchronises the host).

    Call it where a sync is free (batch construction), or pass validate=True to the ops; the training
    step itself stays synchronisation-free so it can be captured in a CUDA graph.
    """
    counted = labels[labels != ignore_index]
    if counted.numel() == 0:
        return
    largest, smallest = int(counted.max()), int(counted.min())
    if largest >= vocab_size or smallest < 0:
        bad = largest if largest >= vocab_size else smallest
        raise ValueError(f"labels: token id {bad} is outside the vocabulary of size {vocab_size} "
                         f"(largest id {largest}, smallest {smallest}; ignore_index={ignore_index})")


class LinearTokenLossFunction(torch.autograd.Function):
    """Per-token loss lse - (1-e) z_y - e/V sum z from hidden states, one chunk of logits at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, backend):
        module = kernels(backend)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        # With a frozen head the gradient of each token's loss w.r.t. its hidden state can be formed in the
        # forward pass from the same chunk of logits (no recomputation); backward only scales it.
        grad_in_forward = need_hidden and not need_weight and not need_bias and module.GRAD_IN_FORWARD
        losses, lse, grad_hidden = module.token_loss_forward(hidden, weight, bias, labels, ignore_index,
                                                             label_smoothing, grad_in_forward)
        if grad_in_forward:
            ctx.save_for_backward(grad_hidden)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.config = (ignore_index, label_smoothing, backend, grad_in_forward)
        ctx.mark_non_differentiable(lse)
        return losses, lse

    @staticmethod
    def backward(ctx, grad_losses, _grad_lse):
        ignore_index, label_smoothing, backend, grad_in_forward = ctx.config
        if grad_in_forward:
            (grad_hidden,) = ctx.saved_tensors
            return (grad_hidden * grad_losses.to(grad_hidden.dtype)[:, None], None, None, None, None, None, None)
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = kernels(backend).token_loss_backward(
            grad_losses.float().contiguous(), hidden, weight, bias, labels, lse, ignore_index, label_smoothing,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
        return (*grads, None, None, None, None)


def token_losses(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                 ignore_index: int = -100, label_smoothing: float = 0.0, validate: bool = False) -> Tensor:
    """Per-token cross-entropy [*labels.shape] in fp32, 0 at ignored positions, without full logits."""
    check_head_args(hidden, weight, labels, bias, label_smoothing)
    if validate:
        check_labels(labels, weight.shape[0], ignore_index)
    backend = select_backend("linear_cross_entropy", hidden, IMPLEMENTED)
    hidden2d, labels1d = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if bias is not None:
        bias = bias.to(hidden.dtype)
    if backend == "reference":
        losses = reference_token_losses(hidden2d, weight, labels1d, bias, ignore_index, label_smoothing)
    else:
        losses, _ = LinearTokenLossFunction.apply(hidden2d.contiguous(), weight.contiguous(), bias, labels1d.contiguous(),
                                                  ignore_index, float(label_smoothing), backend)
    return losses.reshape(labels.shape)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         num_items_in_batch: Optional[Union[int, Tensor]] = None, validate: bool = False) -> Tensor:
    """F.cross_entropy(hidden @ W^T + b, labels) in value and gradients, computed in fp32 chunks.

    Labels are aligned with hidden (already shifted for next-token prediction). `reduction="mean"`
    divides by the number of counted tokens, or by `num_items_in_batch` when given (the token count of
    the whole accumulated batch, as transformers does, so gradient accumulation equals one big batch).
    All-ignored input gives 0 (not NaN) and zero gradients. The result is fp32.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    losses = token_losses(hidden, weight, labels, bias, ignore_index, label_smoothing, validate)
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is None:
        num_items_in_batch = (labels != ignore_index).sum()
    if isinstance(num_items_in_batch, Tensor):
        return total / num_items_in_batch.to(total.device, torch.float32).clamp_min(1.0)
    return total / max(float(num_items_in_batch), 1.0)


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                    ignore_index: int = -100, validate: bool = False) -> Tensor:
    """Per-token log p(label) [*labels.shape] in fp32 (0 at ignored positions), without full logits."""
    return -token_losses(hidden, weight, labels, bias, ignore_index, 0.0, validate)


def reference_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                       ignore_index: int = -100) -> Tensor:
    """Per-token log p(label) from full logits + log_softmax + gather (the naive path), 0 where ignored."""
    logits = torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    valid = labels != ignore_index
    gathered = logits.log_softmax(-1).gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, gathered, torch.zeros_like(gathered))

"""Torch token losses (the "cpu" backend): chunks of tokens whose [chunk, vocab] fp32 logits fit a memory budget."""

import torch

# Bytes of fp32 logits one chunk may hold; the chunk's softmax reuses that buffer in place.
CHUNK_BUDGET_BYTES = 256 * 2**20
# Measured (benchmarks/linear_cross_entropy.py): forming dL/dh from the forward's chunk of logits saves the
# backward's recomputation of every logits GEMM when the head is frozen (the LoRA case).
GRAD_IN_FORWARD = True


def chunk_rows(vocab_size: int, budget_bytes: int = None) -> int:
    """Tokens per chunk so that one fp32 [chunk, vocab] buffer fits the budget."""
    budget = CHUNK_BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // (4 * max(vocab_size, 1)))


def chunk_logits(hidden, weight32, bias32):
    """fp32 logits of one chunk of tokens (weight and bias already fp32)."""
    if bias32 is None:
        return torch.mm(hidden.float(), weight32.t())
    return torch.addmm(bias32, hidden.float(), weight32.t())


def as_fp32(weight, bias):
    """The head in fp32, converted once per call rather than once per chunk."""
    return weight.float(), None if bias is None else bias.float()


def logit_chunks(hidden, weight32, bias32, labels, ignore_index):
    """(start, stop, fp32 logits, counted-token mask, labels with ignored ones set to 0) per chunk of tokens."""
    rows = chunk_rows(weight32.shape[0])
    for start in range(0, hidden.shape[0], rows):
        stop = min(start + rows, hidden.shape[0])
        valid = labels[start:stop] != ignore_index
        safe = torch.where(valid, labels[start:stop], 0).long()
        yield start, stop, chunk_logits(hidden[start:stop], weight32, bias32), valid, safe


def probs_to_grad_(probs, safe_labels, valid, label_smoothing, token_scale=None):
    """Turn a chunk of softmax probabilities into dLoss/dlogits in place: p - (1-e) onehot - e/V, 0 if ignored."""
    grad = probs.scatter_add_(1, safe_labels[:, None], torch.full_like(probs[:, :1], -(1.0 - label_smoothing)))
    if label_smoothing:
        grad.sub_(label_smoothing / probs.shape[1])
    scale = valid.to(grad.dtype) if token_scale is None else token_scale * valid
    return grad.mul_(scale[:, None])


def token_loss_forward(hidden, weight, bias, labels, ignore_index, label_smoothing, grad_in_forward):
    """Return (losses [N] fp32, lse [N] fp32, dLoss_i/dh_i [N, D] or None)."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    losses = torch.empty(n_tokens, dtype=torch.float32)
    lse = torch.empty(n_tokens, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if grad_in_forward else None
    weight32, bias32 = as_fp32(weight, bias)
    for start, stop, logits, valid, safe in logit_chunks(hidden, weight32, bias32, labels, ignore_index):
        target = logits.gather(1, safe[:, None]).squeeze(1)
        sum_logits = logits.sum(1) if label_smoothing else None
        # Softmax in place: the chunk's one [rows, vocab] buffer holds logits, then exp, then probabilities.
        row_max = logits.amax(1)
        exp = logits.sub_(row_max[:, None]).exp_()
        sum_exp = exp.sum(1)
        chunk_lse = row_max + sum_exp.log()
        loss = chunk_lse - (1.0 - label_smoothing) * target
        if label_smoothing:
            loss -= (label_smoothing / vocab) * sum_logits
        losses[start:stop] = torch.where(valid, loss, torch.zeros_like(loss))
        lse[start:stop] = chunk_lse
        if grad_in_forward:
            grad = probs_to_grad_(exp.div_(sum_exp[:, None]), safe, valid, label_smoothing)
            grad_hidden[start:stop] = torch.mm(grad, weight32)
    return losses, lse, grad_hidden


def token_loss_backward(grad_losses, hidden, weight, bias, labels, lse, ignore_index, label_smoothing, *,
                        need_hidden, need_weight, need_bias):
    """Gradients (hidden, weight, bias) from per-token upstream gradients, recomputing each chunk's logits."""
    vocab = weight.shape[0]
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32) if need_bias else None
    weight32, bias32 = as_fp32(weight, bias)
    for start, stop, logits, valid, safe in logit_chunks(hidden, weight32, bias32, labels, ignore_index):
        probs = logits.sub_(lse[start:stop, None]).exp_()
        grad = probs_to_grad_(probs, safe, valid, label_smoothing, grad_losses[start:stop])
        if need_hidden:
            grad_hidden[start:stop] = torch.mm(grad, weight32)
        if need_weight:
            grad_weight.addmm_(grad.t(), hidden[start:stop].float())
        if need_bias:
            grad_bias += grad.sum(0)
    return (grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))

"""Triton kernels for the LM-head loss: online logsumexp over vocabulary tiles, logits never in memory."""

import functools

import torch
import triton
import triton.language as tl

from mrgfast.ops.backends.triton.common import launch_settings, split_for_parallelism
from mrgfast.ops.backends.triton.lora_fused import matmul_tn
from mrgfast.ops.backends.triton.tuning import Tuned, token_bucket

# With a frozen head, the forward can form dL/dh (as Liger does): per chunk of tokens, the logits from
# one cuBLAS GEMM, a row kernel turning them into dL/dlogits in place, a second GEMM: 2 GEMMs instead of
# the 3 of recomputing (fused online-logsumexp forward + recomputed logits in backward + dL/dh GEMM),
# for two extra passes over a [chunk, vocab] buffer. Chosen by the CPU measurement and that count
# (benchmarks/linear_cross_entropy.py times both modes; it has not yet run on a GPU).
GRAD_IN_FORWARD = True
# Bytes of logits / dL/dlogits (in the hidden dtype) one chunk of tokens may hold.
CHUNK_BUDGET_BYTES = 256 * 2**20


@triton.jit
def logits_tile(H, W, BIAS, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 logits [BLOCK_N, BLOCK_V] of a token tile against a vocabulary tile, reduced over D on chip."""
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(H + offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(W + offs_d[:, None] * stride_wd + offs_v[None, :] * stride_wv,
                    mask=mask_d[:, None] & mask_v[None, :], other=0.0)
        if DOT_FP32:  # the interpreter multiplies raw bf16 bit patterns in tl.dot
            h, w = h.to(tl.float32), w.to(tl.float32)
        z = tl.dot(h, w, z, input_precision=PRECISION)
    if HAS_BIAS:
        z += tl.load(BIAS + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def lse_forward_kernel(
    H, W, BIAS, LABELS, MAX_PART, SUM_PART, TARGET_PART, SUMZ_PART,
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, SMOOTHING: tl.constexpr, SPLIT_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per token, over one split of the vocabulary: running max, sum of exp, the target logit, sum of logits."""
    pid_n, pid_split = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(LABELS + offs_n, mask=mask_n, other=-1).to(tl.int64)
    per_split = tl.cdiv(tl.cdiv(V, SPLIT_V), BLOCK_V) * BLOCK_V
    v_start = pid_split * per_split
    v_end = tl.minimum(v_start + per_split, V)

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = logits_tile(H, W, BIAS, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, PRECISION)
        is_target = offs_v[None, :] == labels[:, None]
        target += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        if SMOOTHING:
            sum_z += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    out = pid_split * N + offs_n
    tl.store(MAX_PART + out, run_max, mask=mask_n)
    tl.store(SUM_PART + out, run_sum, mask=mask_n)
    tl.store(TARGET_PART + out, target, mask=mask_n)
    if SMOOTHING:
        tl.store(SUMZ_PART + out, sum_z, mask=mask_n)


@triton.jit
def logits_grad_kernel(
    H, W, BIAS, LABELS, LSE, SCALE, G,
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, stride_gn, stride_gv,
    smoothing, ignore_index,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """G = dLoss/dlogits for a chunk of tokens: (softmax - (1-e) onehot - e/V) * upstream, 0 where ignored."""
    pid_n, pid_v = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n, mask_v = offs_n < N, offs_v < V
    z = logits_tile(H, W, BIAS, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, PRECISION)
    labels = tl.load(LABELS + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)
    lse = tl.load(LSE + offs_n, mask=mask_n, other=0.0)
    scale = tl.load(SCALE + offs_n, mask=mask_n, other=0.0)
    scale = tl.where(labels != ignore_index, scale, 0.0)
    grad = tl.exp(z - lse[:, None]) - smoothing / V
    grad = tl.where(offs_v[None, :] == labels[:, None], grad - (1.0 - smoothing), grad) * scale[:, None]
    tl.store(G + offs_n[:, None] * stride_gn + offs_v[None, :] * stride_gv, grad.to(G.dtype.element_ty),
             mask=mask_n[:, None] & mask_v[None, :])


@triton.jit
def row_loss_grad_kernel(
    LOGITS, LABELS, LOSS, LSE, V, stride_row, smoothing, ignore_index, BLOCK_V: tl.constexpr,
):
    """One token's row of logits in memory: its loss and logsumexp, then dL/dlogits written over the row."""
    row = tl.program_id(0)
    label = tl.load(LABELS + row).to(tl.int64)
    logits = LOGITS + row.to(tl.int64) * stride_row
    run_max = float("-inf")
    run_sum = 0.0
    target = 0.0
    sum_z = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = tl.load(logits + offs_v, mask=mask_v, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        run_max = new_max
        target += tl.sum(tl.where(offs_v == label, z, 0.0), axis=0)
        sum_z += tl.sum(tl.where(mask_v, z, 0.0), axis=0)
    lse = run_max + tl.log(run_sum)
    valid = label != ignore_index
    loss = lse - (1.0 - smoothing) * target - (smoothing / V) * sum_z
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, lse)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = tl.load(logits + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - smoothing / V
        grad = tl.where(offs_v == label, grad - (1.0 - smoothing), grad)
        grad = tl.where(valid, grad, 0.0)
        tl.store(logits + offs_v, grad.to(LOGITS.dtype.element_ty), mask=mask_v)


# The token count N is tuned by its power-of-two bucket: packed batches change length every step.
@functools.cache
def _tuned_forward() -> Tuned:
    """lse_forward_kernel under the tuner (built lazily: the interpreter has no benchmarker)."""
    configs = [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}, num_warps=w, num_stages=s)
               for n, v, d, w, s in [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
                                     (128, 64, 64, 4, 4), (64, 64, 32, 4, 3)]]
    return Tuned(lse_forward_kernel, configs, key=["N", "V", "D"], buckets=["N"])


@functools.cache
def _tuned_grad() -> Tuned:
    """logits_grad_kernel under the tuner."""
    configs = [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}, num_warps=w, num_stages=s)
               for n, v, d, w, s in [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                     (64, 64, 32, 4, 3)]]
    return Tuned(logits_grad_kernel, configs, key=["N", "V", "D"], buckets=["N"])


def interpreter_blocks(vocab_size: int) -> dict:
    """Fixed tiles for the interpreter: small ones exercise masking; wide ones keep big vocabularies quick."""
    return dict(BLOCK_N=16, BLOCK_V=32 if vocab_size < 8192 else 1024, BLOCK_D=16)


def token_loss_forward(hidden, weight, bias, labels, ignore_index, label_smoothing, grad_in_forward):
    """Return (losses [N] fp32, lse [N] fp32, dLoss_i/dh_i [N, D] or None)."""
    if grad_in_forward:
        return loss_and_grad_forward(hidden, weight, bias, labels, ignore_index, label_smoothing)
    return online_loss_forward(hidden, weight, bias, labels, ignore_index, label_smoothing)


def loss_and_grad_forward(hidden, weight, bias, labels, ignore_index, label_smoothing):
    """Per chunk of tokens: logits by GEMM, loss and dL/dlogits by the row kernel (in place), dL/dh by GEMM."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    settings = launch_settings(hidden)
    losses = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden)
    rows = chunk_rows(vocab, hidden.element_size())
    # One program per row walks the vocabulary; in the interpreter a small vocabulary gets narrower tiles
    # so that masking of a partial last tile is still exercised.
    widest = 256 if settings.interpret and vocab < 8192 else 4096
    block_v = min(widest, triton.next_power_of_2(vocab))
    for start in range(0, n_tokens, rows):  # n_tokens is a static shape: no host synchronisation
        stop = min(start + rows, n_tokens)
        chunk = hidden[start:stop]
        logits = torch.mm(chunk, weight.t()) if bias is None else torch.addmm(bias, chunk, weight.t())
        row_loss_grad_kernel[(stop - start,)](logits, labels[start:stop], losses[start:stop], lse[start:stop], vocab,
                                              logits.stride(0), float(label_smoothing), int(ignore_index),
                                              BLOCK_V=block_v)
        grad_hidden[start:stop] = torch.mm(logits, weight)
    return losses, lse, grad_hidden


def online_loss_forward(hidden, weight, bias, labels, ignore_index, label_smoothing):
    """Return (losses, lse, None) with the logits only ever as on-chip tiles (no gradient formed)."""
    (n_tokens, dim), vocab = hidden.shape, weight.shape[0]
    settings = launch_settings(hidden)
    device = hidden.device
    # Few token tiles cannot fill the GPU: split the vocabulary too, merging the partial logsumexps after.
    # Tiles counted from the token bucket: SPLIT_V is a constexpr in the tuning key and must not follow every length.
    split = 1 if settings.interpret else split_for_parallelism(vocab, triton.cdiv(token_bucket(n_tokens), 64), device,
                                                               4096)
    if settings.interpret:
        blocks = interpreter_blocks(vocab)
        split = 2 if vocab > 2 * blocks["BLOCK_V"] else 1  # exercise the merge in tests too
    parts = torch.empty((4, split, n_tokens), dtype=torch.float32, device=device)
    if n_tokens:
        args = (hidden, weight, bias if bias is not None else hidden, labels, parts[0], parts[1], parts[2], parts[3],
                n_tokens, vocab, dim, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
        flags = dict(HAS_BIAS=bias is not None, SMOOTHING=label_smoothing > 0.0, SPLIT_V=split, **settings.flags)
        if settings.interpret:
            grid = (triton.cdiv(n_tokens, blocks["BLOCK_N"]), split)
            lse_forward_kernel[grid](*args, **flags, **blocks)
        else:
            grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]), split)  # noqa: E731
            _tuned_forward()(grid, *args, **flags)
    run_max, run_sum, target = parts[0], parts[1], parts[2]
    lse = torch.logsumexp(run_max + torch.log(run_sum), dim=0)
    losses = lse - (1.0 - label_smoothing) * target.sum(0)
    if label_smoothing:
        losses = losses - (label_smoothing / vocab) * parts[3].sum(0)
    losses = torch.where(labels != ignore_index, losses, torch.zeros_like(losses))
    return losses, lse, None


def chunk_rows(vocab_size: int, element_size: int, budget_bytes: int = None) -> int:
    """Tokens per backward chunk so that dL/dlogits [chunk, vocab] fits the budget."""
    budget = CHUNK_BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(16, budget // (element_size * max(vocab_size, 1)))


def token_loss_backward(grad_losses, hidden, weight, bias, labels, lse, ignore_index, label_smoothing, *,
                        need_hidden, need_weight, need_bias):
    """Gradients (hidden, weight, bias): per chunk of tokens, G = dL/dlogits by the kernel, then two GEMMs."""
    (n_tokens, dim), vocab = hidden.shape, weight.shape[0]
    settings = launch_settings(hidden)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_bias else None
    rows = chunk_rows(vocab, hidden.element_size())
    grad_logits = torch.empty((min(rows, n_tokens), vocab), dtype=hidden.dtype, device=hidden.device)
    flags = dict(HAS_BIAS=bias is not None, **settings.flags)
    for start in range(0, n_tokens, rows):  # n_tokens is a static shape: no host synchronisation
        stop = min(start + rows, n_tokens)
        chunk, g = hidden[start:stop], grad_logits[: stop - start]
        args = (chunk, weight, bias if bias is not None else chunk, labels[start:stop], lse[start:stop],
                grad_losses[start:stop], g, stop - start, vocab, dim, chunk.stride(0), chunk.stride(1),
                weight.stride(0), weight.stride(1), g.stride(0), g.stride(1), float(label_smoothing), int(ignore_index))
        if settings.interpret:
            blocks = interpreter_blocks(vocab)
            grid = (triton.cdiv(stop - start, blocks["BLOCK_N"]), triton.cdiv(vocab, blocks["BLOCK_V"]))
            logits_grad_kernel[grid](*args, **flags, **blocks)
        else:
            grid = lambda meta: (triton.cdiv(stop - start, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"]))  # noqa: E731,B023
            _tuned_grad()(grid, *args, **flags)
        if need_hidden:
            grad_hidden[start:stop] = torch.mm(g, weight)
        if need_weight:
            matmul_tn(g, chunk, out=grad_weight)
        if need_bias:
            grad_bias += g.sum(0, dtype=torch.float32)
    return (grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


def aot_specs():
    """The variants CI compiles ahead of time for sm_80 and sm_90 (see mrgfast.ops.backends.triton.aot)."""
    from mrgfast.ops.backends.triton.aot import AotSpec

    specs = []
    for dtype, precision, (block_n, block_v, warps) in (("bf16", "ieee", (128, 128, 8)),
                                                         ("fp16", "ieee", (64, 128, 4)),
                                                         ("fp32", "tf32", (64, 64, 4))):
        ptr = f"*{dtype}"
        common = dict(HAS_BIAS=True, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=64 if dtype != "fp32" else 32,
                      DOT_FP32=False, PRECISION=precision)
        parts = {name: "*fp32" for name in ("MAX_PART", "SUM_PART", "TARGET_PART", "SUMZ_PART")}
        for smoothing in (False, True):
            specs.append(AotSpec(f"{dtype}-{precision} smooth={int(smoothing)}", lse_forward_kernel,
                                 {"H": ptr, "W": ptr, "BIAS": ptr, "LABELS": "*i64", **parts},
                                 dict(common, SMOOTHING=smoothing, SPLIT_V=4), num_warps=warps))
        specs.append(AotSpec(f"{dtype}", row_loss_grad_kernel, {"LOGITS": ptr, "LABELS": "*i64", "LOSS": "*fp32",
                                                               "LSE": "*fp32"},
                             dict(BLOCK_V=4096), floats=("smoothing",), num_warps=8, tensor_cores=()))
        specs.append(AotSpec(f"{dtype}-{precision}", logits_grad_kernel,
                             {"H": ptr, "W": ptr, "BIAS": ptr, "LABELS": "*i64", "LSE": "*fp32", "SCALE": "*fp32",
                              "G": ptr}, common, floats=("smoothing",), num_warps=warps))
    return specs

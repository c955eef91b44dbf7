"""The one varlen attention function: causal attention within each document of a packed token stream.

On CUDA: flash-attn's varlen kernel, else torch's varlen_attn (whatever signature this torch has), else
FlexAttention with a block-sparse document mask, else one SDPA with a dense document mask. On CPU: one SDPA per
document (exact, and torch's fused CPU kernel). Never a Python loop over documents on CUDA.
"""

import dataclasses
import functools
import importlib.util
import inspect
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mrgfast.layout import Segments
from mrgfast.ops.backend import requested_backend

HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """Whether the flash-attn package can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


@dataclasses.dataclass(frozen=True)
class VarlenCall:
    """How this torch's `varlen_attn` is called: the function, its causal keyword and whether it takes GQA."""

    function: Callable
    causal: dict                      # {"window_size": (-1, 0)} or {"is_causal": True}: bottom-right causal
    enable_gqa: bool                  # without it, K/V heads are expanded to the query heads first


@functools.lru_cache(maxsize=None)
def torch_varlen_call() -> Optional[VarlenCall]:
    """torch's own varlen_attn as this torch's signature allows it (window_size or is_causal, with or without
    enable_gqa: torch 2.11 has window_size but no enable_gqa), or None where torch has none or no causal option."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_call(varlen_attn, inspect.signature(varlen_attn).parameters)


def varlen_call(function: Callable, params) -> Optional[VarlenCall]:
    """The VarlenCall for a varlen_attn with these parameters, or None without a causal option."""
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return VarlenCall(function, causal, "enable_gqa" in params)


@functools.lru_cache(maxsize=None)
def flex_attention_function() -> Optional[Callable]:
    """torch.compile'd FlexAttention (torch >= 2.5), compiled once per process, or None."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    # Packed eager batches change length every step: after the first recompile dynamo marks the lengths dynamic.
    return torch.compile(flex_attention)


def choose_backend(on_cuda: bool, dtype: torch.dtype, forced_reference: bool, flash: bool, varlen: bool,
                   flex: bool) -> str:
    """The attention kernel for a query tensor: on CUDA flash-attn, then torch's varlen_attn (half dtypes), then
    FlexAttention with a document block mask, then one SDPA with a dense document mask; "sdpa" (per document,
    exact) on CPU or under MRGFAST_BACKEND=reference. No CUDA path loops over documents in Python."""
    if forced_reference or not on_cuda:
        return "sdpa"
    if dtype in HALF_DTYPES and flash:
        return "flash_attn"
    if dtype in HALF_DTYPES and varlen:
        return "torch_varlen"
    return "flex" if flex else "masked_sdpa"


def attention_backend(q: Tensor) -> str:
    """The backend varlen_attention runs for `q` (see choose_backend); the first choice per device and dtype is
    logged once to stderr."""
    backend = choose_backend(q.is_cuda, q.dtype, requested_backend() == "reference", flash_attn_available(),
                             torch_varlen_call() is not None, flex_attention_function() is not None)
    log_backend_once(backend, q.device.type, q.dtype)
    return backend


@functools.lru_cache(maxsize=None)
def log_backend_once(backend: str, device_type: str, dtype: torch.dtype) -> None:
    """One stderr line naming the attention kernel for CUDA tensors (CPU always runs per-document SDPA)."""
    if device_type == "cuda":
        print(f"mrgfast: attention on cuda/{str(dtype).removeprefix('torch.')}: {backend}", file=sys.stderr)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, seg_q: Segments, seg_k: Optional[Segments] = None,
                     scale: Optional[float] = None) -> Tensor:
    """Causal attention of packed q [Tq, Hq, D] over packed k, v [Tk, Hkv, D] (GQA when Hkv < Hq), document by
    document; a document's queries are its last tokens (bottom-right causal, as flash-attn), so decoding with
    a KV cache is the case of one query per document. Returns [Tq, Hq, D]."""
    seg_k = seg_q if seg_k is None else seg_k
    if not seg_q.on_host or not seg_k.on_host:
        return static_varlen_attention(q, k, v, seg_q, seg_k, scale)
    if len(seg_q.bounds) != len(seg_k.bounds):
        raise ValueError(f"seg_q has {len(seg_q.bounds) - 1} documents but seg_k has {len(seg_k.bounds) - 1}")
    if any(lq > lk for lq, lk in zip(seg_q.lengths, seg_k.lengths)):
        raise ValueError(f"a document has more queries than keys: {seg_q.lengths} vs {seg_k.lengths}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    backend = attention_backend(q)
    if backend in ("flash_attn", "torch_varlen"):
        return fused_varlen(backend, q, k, v, seg_q, seg_k, scale)
    if backend == "flex":
        return flex_varlen(q, k, v, seg_q, seg_k, scale)
    if backend == "masked_sdpa":
        return masked_sdpa(q, k, v, seg_q, seg_k, scale)
    return per_document_sdpa(q, k, v, seg_q, seg_k, scale)


def fused_varlen(backend: str, q: Tensor, k: Tensor, v: Tensor, seg_q: Segments, seg_k: Segments,
                 scale: Optional[float]) -> Tensor:
    """flash-attn's ("flash_attn") or torch's ("torch_varlen") varlen kernel: reads only the device cu_seqlens
    and the max lengths, bottom-right causal."""
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func(q, k, v, seg_q.cu_seqlens, seg_k.cu_seqlens, seg_q.max_len, seg_k.max_len,
                                      softmax_scale=scale, causal=True)
    call = torch_varlen_call()
    gqa = {"enable_gqa": True} if call.enable_gqa else {}
    if not call.enable_gqa:
        k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    return call.function(q, k, v, seg_q.cu_seqlens, seg_k.cu_seqlens, seg_q.max_len, seg_k.max_len, scale=scale,
                         **call.causal, **gqa)


def expand_kv_heads(kv: Tensor, query_heads: int) -> Tensor:
    """K or V [T, Hkv, D] repeated to [T, Hq, D] as GQA shares them: query head h reads kv head h // (Hq / Hkv)."""
    groups = query_heads // kv.shape[1]
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def document_mask(seg_q: Segments, seg_k: Segments, q_len: int, k_len: int) -> Callable:
    """FlexAttention's mask_mod for packed documents, built on the device from cu_seqlens alone: query i sees key j
    when both lie in one document and j is not after i, bottom-right aligned (a document's queries are the last
    of its keys), so empty documents, KV caches and DPO's gathered keys mask as in varlen_attention."""
    device = seg_q.cu_seqlens.device
    bounds_q, bounds_k = seg_q.cu_seqlens.long(), seg_k.cu_seqlens.long()
    rows_q, rows_k = torch.arange(q_len, device=device), torch.arange(k_len, device=device)
    # The document of a token: the last one starting at or before it (skips empty documents sharing its start).
    doc_q = torch.searchsorted(bounds_q, rows_q, right=True) - 1
    doc_k = torch.searchsorted(bounds_k, rows_k, right=True) - 1
    lengths_q, lengths_k = bounds_q.diff(), bounds_k.diff()
    # Each token's place among its document's keys: a query sits after the keys its document has beyond its queries.
    place_q = rows_q - bounds_q[doc_q] + (lengths_k - lengths_q)[doc_q]
    place_k = rows_k - bounds_k[doc_k]

    def mask_mod(batch, head, q_index, kv_index):
        return (doc_q[q_index] == doc_k[kv_index]) & (place_k[kv_index] <= place_q[q_index])

    return mask_mod


def flex_varlen(q: Tensor, k: Tensor, v: Tensor, seg_q: Segments, seg_k: Segments, scale: Optional[float],
                flex: Optional[Callable] = None) -> Tensor:
    """varlen_attention by FlexAttention over the whole packed stream with a block-sparse document mask: blocks
    no document spans are skipped, so the cost follows the documents, not the stream's full square."""
    from torch.nn.attention.flex_attention import create_block_mask
    flex = flex or flex_attention_function()
    q_len, k_len = q.shape[0], k.shape[0]
    block_mask = create_block_mask(document_mask(seg_q, seg_k, q_len, k_len), None, None, q_len, k_len,
                                   device=q.device)
    out = flex(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask, scale=scale,
               enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, seg_q: Segments, seg_k: Segments,
                scale: Optional[float]) -> Tensor:
    """varlen_attention as one SDPA over the whole stream with a dense [Tq, Tk] document mask (torch without
    FlexAttention): one kernel call whatever the document count, at the cost of the full square."""
    mask_mod = document_mask(seg_q, seg_k, q.shape[0], k.shape[0])
    rows_q = torch.arange(q.shape[0], device=q.device)[:, None]
    rows_k = torch.arange(k.shape[0], device=q.device)[None, :]
    mask = mask_mod(None, None, rows_q, rows_k)
    # A query of an empty-key row cannot occur (each document's queries are among its keys): no all-masked row.
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def static_varlen_attention(q: Tensor, k: Tensor, v: Tensor, seg_q: Segments, seg_k: Segments,
                            scale: Optional[float]) -> Tensor:
    """varlen_attention for device-only segments (no host values read): flash-attn / torch varlen on CUDA half
    tensors (empty documents are free there); else causal self-attention as one masked SDPA over whole rows, and
    gathered keys (a static DPO batch's, more keys than queries) as one SDPA with the document mask of both cu_seqlens."""
    if seg_k.on_host or seg_q.on_host:
        raise ValueError("device-only segments (Segments.static) need Segments.static for both queries and keys")
    # Keys as many as the tokens: causal self-attention (seg_k is seg_q's copy; AttentionLayout.causal). A static
    # DPO batch's gathered key stream is always longer (every pair's prompt is gathered again).
    self_attention = q.shape[0] == k.shape[0]
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    backend = attention_backend(q)
    if backend in ("flash_attn", "torch_varlen"):
        return fused_varlen(backend, q, k, v, seg_q, seg_k, scale)
    # No varlen kernel: masks built on the device (graph-capturable; a block mask built inside a captured graph is
    # not). Self-attention stays inside rows; gathered keys cross them, so their mask spans the whole stream.
    if self_attention:
        return row_masked_sdpa(q, k, v, seg_q, scale)
    return masked_sdpa(q, k, v, seg_q, seg_k, scale)


def row_masked_sdpa(q: Tensor, k: Tensor, v: Tensor, seg: Segments, scale: Optional[float]) -> Tensor:
    """Causal attention within documents as one SDPA over rows of width seg.max_len, the document mask built on
    the device from cu_seqlens (static shapes, no host sync; it computes every row's full square)."""
    tokens, heads, dim = q.shape
    width = seg.max_len
    rows = tokens // width
    where = torch.arange(tokens, device=q.device, dtype=seg.cu_seqlens.dtype)
    document = torch.searchsorted(seg.cu_seqlens, where, right=True).view(rows, width)
    causal = torch.ones(width, width, dtype=torch.bool, device=q.device).tril()
    mask = (document[:, :, None] == document[:, None, :]) & causal  # a query always sees itself: no empty row
    out = F.scaled_dot_product_attention(*(t.view(rows, width, t.shape[1], dim).transpose(1, 2) for t in (q, k, v)),
                                         attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(tokens, heads, dim)


def per_document_sdpa(q: Tensor, k: Tensor, v: Tensor, seg_q: Segments, seg_k: Segments,
                      scale: Optional[float]) -> Tensor:
    """varlen_attention by one SDPA call per document: exact, any device and dtype, slow for many documents."""
    outputs = []
    for (qs, qe), (ks, ke) in zip(zip(seg_q.bounds, seg_q.bounds[1:]), zip(seg_k.bounds, seg_k.bounds[1:])):
        n_q, n_k = qe - qs, ke - ks
        if n_q == 0:
            continue
        mask, causal = None, False
        if n_q == n_k:
            causal = n_q > 1
        elif n_q > 1:
            # Queries are the last n_q of n_k tokens: query i sees keys up to n_k - n_q + i.
            offset = n_k - n_q
            mask = (torch.arange(n_k, device=q.device)[None, :]
                    <= torch.arange(n_q, device=q.device)[:, None] + offset)
        # 4-d [1, heads, n, D]: torch's fused CPU (flash) kernel takes only batched input; 3-d goes to the
        # unfused math path (bmm + softmax + masks), several times slower forward and backward.
        out = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None],
                                             v[ks:ke].transpose(0, 1)[None], attn_mask=mask, is_causal=causal,
                                             scale=scale, enable_gqa=True)
        outputs.append(out[0].transpose(0, 1))
    if not outputs:
        return q.new_empty(q.shape)
    return torch.cat(outputs, dim=0)

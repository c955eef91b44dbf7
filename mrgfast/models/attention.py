"""The one varlen attention function: causal attention within each document of a packed token stream."""

import functools
import importlib.util
import inspect
from typing import Optional

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


@functools.lru_cache(maxsize=None)
def torch_varlen_attn():
    """torch's own varlen_attn when this torch has the causal window and GQA options it needs, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn if {"window_size", "enable_gqa"} <= params.keys() else None


def attention_backend(q: Tensor) -> str:
    """"flash_attn" or "torch_varlen" for fp16/bf16 CUDA tensors when available, else "sdpa" (per document).
    MRGFAST_BACKEND=reference forces "sdpa"."""
    if requested_backend() == "reference" or not q.is_cuda or q.dtype not in HALF_DTYPES:
        return "sdpa"
    if flash_attn_available():
        return "flash_attn"
    return "torch_varlen" if torch_varlen_attn() is not None else "sdpa"


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
    if backend != "sdpa":
        return fused_varlen(backend, q, k, v, seg_q, seg_k, scale)
    return per_document_sdpa(q, k, v, seg_q, seg_k, scale)


def fused_varlen(backend: str, q: Tensor, k: Tensor, v: Tensor, seg_q: Segments, seg_k: Segments,
                 scale: Optional[float]) -> Tensor:
    """flash-attn's ("flash_attn") or torch's ("torch_varlen") varlen kernel: reads only the device cu_seqlens
    and the max lengths, bottom-right causal."""
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func(q, k, v, seg_q.cu_seqlens, seg_k.cu_seqlens, seg_q.max_len, seg_k.max_len,
                                      softmax_scale=scale, causal=True)
    return torch_varlen_attn()(q, k, v, seg_q.cu_seqlens, seg_k.cu_seqlens, seg_q.max_len, seg_k.max_len,
                               scale=scale, window_size=(-1, 0), enable_gqa=True)


def static_varlen_attention(q: Tensor, k: Tensor, v: Tensor, seg_q: Segments, seg_k: Segments,
                            scale: Optional[float]) -> Tensor:
    """varlen_attention for device-only segments (causal self-attention, no host values read): flash-attn /
    torch varlen on CUDA half tensors (empty documents are free there), else one masked SDPA over whole rows."""
    # Self-attention only: the keys are the queries' own tokens, so seg_q's documents are seg_k's as well.
    if seg_k.on_host or seg_q.on_host or q.shape[0] != k.shape[0]:
        raise ValueError("device-only segments (Segments.static) support causal self-attention only, with "
                         "Segments.static for both queries and keys")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    backend = attention_backend(q)
    if backend != "sdpa":
        return fused_varlen(backend, q, k, v, seg_q, seg_q, scale)
    return row_masked_sdpa(q, k, v, seg_q, scale)


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

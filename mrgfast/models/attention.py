"""The one varlen attention function: causal attention within each document of a packed token stream."""

import dataclasses
import functools
import importlib.util
import inspect
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mrgfast.backend import requested_backend

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Segments:
    """Document boundaries of a packed stream: cu_seqlens on the device (int32), the same on the host, and the
    longest document (the host copy is made once per forward, not once per layer)."""

    cu_seqlens: Tensor
    bounds: list
    max_len: int

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device) -> "Segments":
        """Segments of documents with these lengths, in order."""
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + int(n))
        return cls(torch.tensor(bounds, dtype=torch.int32, device=device), bounds, max(lengths, default=0))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens, total: int, device) -> "Segments":
        """Segments from cu_seqlens (tensor or ints: 0, end of doc 1, ..., total); ValueError if malformed."""
        bounds = [int(b) for b in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)]
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds)):
            raise ValueError(f"cu_seqlens must rise from 0 to the number of tokens ({total}), got {bounds}")
        return cls.from_lengths([b - a for a, b in zip(bounds, bounds[1:])], device)

    @property
    def lengths(self) -> list:
        """The length of each document."""
        return [b - a for a, b in zip(self.bounds, self.bounds[1:])]


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
    if len(seg_q.bounds) != len(seg_k.bounds):
        raise ValueError(f"seg_q has {len(seg_q.bounds) - 1} documents but seg_k has {len(seg_k.bounds) - 1}")
    if any(lq > lk for lq, lk in zip(seg_q.lengths, seg_k.lengths)):
        raise ValueError(f"a document has more queries than keys: {seg_q.lengths} vs {seg_k.lengths}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    backend = attention_backend(q)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func(q, k, v, seg_q.cu_seqlens, seg_k.cu_seqlens, seg_q.max_len, seg_k.max_len,
                                      softmax_scale=scale, causal=True)
    if backend == "torch_varlen":
        return torch_varlen_attn()(q, k, v, seg_q.cu_seqlens, seg_k.cu_seqlens, seg_q.max_len, seg_k.max_len,
                                   scale=scale, window_size=(-1, 0), enable_gqa=True)
    return per_document_sdpa(q, k, v, seg_q, seg_k, scale)


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
        out = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1),
                                             v[ks:ke].transpose(0, 1), attn_mask=mask, is_causal=causal,
                                             scale=scale, enable_gqa=True)
        outputs.append(out.transpose(0, 1))
    if not outputs:
        return q.new_empty(q.shape)
    return torch.cat(outputs, dim=0)

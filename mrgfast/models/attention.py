"""The one varlen attention function: causal attention within each document of a packed token stream."""

import dataclasses
import functools
import importlib.util
import inspect
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mrgfast.ops.backend import requested_backend

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Segments:
    """Document boundaries of a packed stream: cu_seqlens on the device (int32), the same on the host, and the
    longest document (the host copy is made once per forward, not once per layer).

    Device-only segments (`bounds` None, from `Segments.static`) carry nothing that changes from batch to batch
    on the host, which is what a replayed CUDA graph needs: cu_seqlens has a fixed length (empty documents pad
    it) and `max_len` is the row width, every document lying inside one row of that width."""

    cu_seqlens: Tensor
    bounds: Optional[list]
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

    @classmethod
    def static(cls, cu_seqlens: Tensor, row_width: int) -> "Segments":
        """Device-only segments: cu_seqlens (padded with empty documents to a fixed length) of a stream of rows
        `row_width` long, no document crossing a row; no host copy of the bounds is made."""
        return cls(cu_seqlens, None, row_width)

    @property
    def on_host(self) -> bool:
        """Whether the bounds are known on the host (False for Segments.static)."""
        return self.bounds is not None

    @property
    def lengths(self) -> list:
        """The length of each document (host-side segments only)."""
        if self.bounds is None:
            raise ValueError("device-only Segments (Segments.static) have no host-side document lengths")
        return [b - a for a, b in zip(self.bounds, self.bounds[1:])]

    def to(self, device) -> "Segments":
        """The same segments with the device copy of cu_seqlens on `device`."""
        return Segments(self.cu_seqlens.to(device), self.bounds, self.max_len)


@dataclasses.dataclass
class AttentionLayout:
    """Who attends to whom in a packed stream: query documents `seg_q`, key documents `seg_k`, and the gather
    `kv_index` that builds the key/value stream from the token stream (None: keys are the tokens themselves).

    With a gather, one document's keys can include another's tokens: DPO's shared-prompt packing
    `[prompt, chosen, rejected]` gives the rejected answer the keys `[prompt, rejected]`, and the bottom-right
    causal rule of varlen_attention then masks exactly as if `prompt + rejected` were a sequence of its own.
    """

    seg_q: Segments
    seg_k: Segments
    kv_index: Optional[Tensor] = None

    @classmethod
    def causal(cls, seg: Segments) -> "AttentionLayout":
        """Each document attends causally to itself (the plain packed layout)."""
        return cls(seg, seg, None)

    @classmethod
    def from_lengths(cls, q_lengths: Sequence[int], k_lengths: Sequence[int], kv_index, device) -> "AttentionLayout":
        """A layout of documents with these query and key lengths, keys gathered from the tokens by kv_index."""
        index = torch.as_tensor(kv_index, dtype=torch.long, device=device)
        layout = cls(Segments.from_lengths(q_lengths, device), Segments.from_lengths(k_lengths, device), index)
        layout.check(sum(q_lengths))
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= sum(q_lengths)):
            raise ValueError(f"attention layout: kv_index entries must lie in [0, {sum(q_lengths)}), got "
                             f"[{int(index.min())}, {int(index.max())}]")
        return layout

    def check(self, tokens: int) -> None:
        """ValueError unless the layout fits a stream of `tokens` tokens (counts and shapes only: no device sync)."""
        if not self.seg_q.on_host:
            return self.check_static(tokens)
        if self.seg_q.bounds[-1] != tokens:
            raise ValueError(f"attention layout: seg_q covers {self.seg_q.bounds[-1]} tokens, the stream has {tokens}")
        if len(self.seg_q.bounds) != len(self.seg_k.bounds):
            raise ValueError(f"attention layout: seg_q has {len(self.seg_q.bounds) - 1} documents but seg_k has "
                             f"{len(self.seg_k.bounds) - 1}")
        if any(lq > lk for lq, lk in zip(self.seg_q.lengths, self.seg_k.lengths)):
            raise ValueError(f"attention layout: a document has more queries than keys: {self.seg_q.lengths} vs "
                             f"{self.seg_k.lengths}")
        if self.kv_index is None:
            if self.seg_k.bounds[-1] != tokens:
                raise ValueError(f"attention layout: seg_k covers {self.seg_k.bounds[-1]} keys without a kv_index, "
                                 f"the stream has {tokens} tokens")
            return
        if self.kv_index.dim() != 1 or self.kv_index.shape[0] != self.seg_k.bounds[-1]:
            raise ValueError(f"attention layout: kv_index must be [{self.seg_k.bounds[-1]}] (one entry per key), "
                             f"got shape {tuple(self.kv_index.shape)}")

    def check_static(self, tokens: int) -> None:
        """check() for device-only segments: causal, whole rows of the segments' width."""
        if self.seg_k.on_host or self.seg_k.max_len != self.seg_q.max_len or self.kv_index is not None:
            raise ValueError("attention layout: device-only segments (Segments.static) support the plain causal "
                             "layout only (AttentionLayout.causal)")
        if tokens % self.seg_q.max_len:
            raise ValueError(f"attention layout: static segments of row width {self.seg_q.max_len} cannot cover "
                             f"{tokens} tokens")

    def gather(self, k: Tensor, v: Tensor):
        """The key and value streams [Tk, heads, D] from the per-token k, v [T, heads, D]."""
        if self.kv_index is None:
            return k, v
        return k.index_select(0, self.kv_index), v.index_select(0, self.kv_index)

    def position_offsets(self) -> Optional[list]:
        """Per document, the position of its first query: keys before the queries come first (lk - lq); None for
        device-only segments (whose batches carry their position ids)."""
        if not self.seg_q.on_host:
            return None
        return [lk - lq for lq, lk in zip(self.seg_q.lengths, self.seg_k.lengths)]

    def to(self, device) -> "AttentionLayout":
        """The same layout with its tensors on `device`."""
        index = None if self.kv_index is None else self.kv_index.to(device)
        seg_q = self.seg_q.to(device)
        return AttentionLayout(seg_q, seg_q if self.seg_k is self.seg_q else self.seg_k.to(device), index)


@dataclasses.dataclass
class OutputRows:
    """Rows of a packed stream whose final hidden states are needed (`index`, ascending), one suffix of each
    document (`seg`: their lengths, 0 for a document with none): bottom-right causal attention then lets each
    such row see exactly the keys it sees in the full stream."""

    index: Tensor
    seg: Segments

    @classmethod
    def suffixes(cls, seg: Segments, starts: Sequence[int], device) -> "OutputRows":
        """For documents `seg` (host bounds), the rows from starts[i] (a position in the stream inside document
        i, or its end for none) to the end of each document."""
        ends = seg.bounds[1:]
        if len(starts) != len(ends) or any(not a <= s <= e for a, s, e in zip(seg.bounds, starts, ends)):
            raise ValueError(f"output rows: each start must lie inside its document {seg.bounds}, got {list(starts)}")
        index = torch.cat([torch.arange(s, e) for s, e in zip(starts, ends)]) if ends else torch.zeros(0)
        return cls(index.to(device=device, dtype=torch.long), Segments.from_lengths(
            [e - s for s, e in zip(starts, ends)], device))

    def check(self, layout: AttentionLayout, cache) -> None:
        """ValueError unless these rows fit `layout`: plain causal documents, host bounds, no KV cache."""
        if cache is not None or layout.kv_index is not None or not layout.seg_q.on_host:
            raise ValueError("output_rows needs the plain causal layout with host bounds and no KV cache")
        if len(self.seg.bounds) != len(layout.seg_q.bounds):
            raise ValueError(f"output_rows has {len(self.seg.bounds) - 1} documents, the layout "
                             f"{len(layout.seg_q.bounds) - 1}")

    def to(self, device) -> "OutputRows":
        """The same rows with their tensors on `device`."""
        return OutputRows(self.index.to(device), self.seg.to(device))


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

"""Packed-stream layout types shared by data (which builds them) and models (which attend by them).

`Segments`: the document bounds of a packed token stream; `AttentionLayout`: which keys each document's queries
see (causal documents, DPO's shared prompts); `OutputRows`: the rows whose final hidden states are needed.
"""

import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor


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
        """check() for device-only segments: whole rows of the segments' width, keys the tokens themselves
        (AttentionLayout.causal) or gathered by a kv_index with device-only key segments (static DPO batches)."""
        if self.seg_k.on_host or self.seg_k.max_len != self.seg_q.max_len:
            raise ValueError("attention layout: device-only segments (Segments.static) need device-only key "
                             "segments of the same row width")
        if self.kv_index is not None and self.kv_index.dim() != 1:
            raise ValueError(f"attention layout: kv_index must be 1-D, got shape {tuple(self.kv_index.shape)}")
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

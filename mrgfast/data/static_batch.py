"""Static-shape packed batches for CUDA-graph replay: everything a step computes with becomes a fixed-shape tensor.

A captured graph bakes in shapes and every host-side value it was recorded with. A PackedBatch already has fixed
[rows, budget] token tensors, but its document bounds, placeholder spans and image count change from batch to
batch. `make_static` turns those into tensors of a run-wide fixed size (StaticShape): cu_seqlens padded with empty
documents (device-only Segments: attention reads no host bounds), pixel_values padded with blank samples, and per
slot kind the flat positions the adapter outputs are written to, the padded samples' outputs aimed at one scratch
row past the stream. Two batches with the same StaticShape then have equal graph signatures. DPO's shared-prompt
batches (gathered keys, scored answers, pair slots) get the same treatment in mrgfast.data.static_dpo.
"""

import dataclasses
from typing import Sequence

import torch
from torch import Tensor

from mrgfast.data.packing import PackedBatch, span_positions, spans_in_order
from mrgfast.layout import AttentionLayout, Segments


@dataclasses.dataclass(frozen=True)
class StaticShape:
    """The sizes every batch of a run is padded to: documents (cu_seqlens has max_documents + 1 entries) and
    samples (pixel_values' first dimension)."""

    max_documents: int
    max_samples: int

    @classmethod
    def for_lengths(cls, lengths: Sequence[int], budget: int, rows: int) -> "StaticShape":
        """Bounds that hold for any batch the packer makes from samples of these token lengths: a row fits at most
        budget // shortest samples, plus its padding tail as one more document."""
        if not lengths:
            raise ValueError("StaticShape.for_lengths needs the dataset's sample lengths, got none")
        per_row = budget // max(1, min(min(lengths), budget))
        return cls(max_documents=rows * (per_row + 1), max_samples=rows * per_row)


def make_static(batch: PackedBatch, shape: StaticShape) -> PackedBatch:
    """The host-side SFT batch with static-size document bounds, pixel values and slot indices (see module doc);
    ValueError naming the limit when the batch exceeds `shape`, or for DPO batches (mrgfast.data.static_dpo's)."""
    if batch.dpo_index is not None or batch.layout is not None:
        raise ValueError("make_static takes SFT batches only: a DPO batch is made static by "
                         "mrgfast.data.static_dpo.make_static_dpo (with a StaticDPOShape)")
    rows, width = batch.input_ids.shape
    bounds = batch.cu_seqlens.tolist()
    while len(bounds) > 2 and bounds[-1] == bounds[-2]:  # empty documents a collator may already have added
        bounds.pop()
    if len(bounds) - 1 > shape.max_documents:
        raise ValueError(f"the batch has {len(bounds) - 1} documents, more than max_documents="
                         f"{shape.max_documents} of its static shape")
    samples = len(batch.sample_ids)
    if samples > shape.max_samples:
        raise ValueError(f"the batch has {samples} samples, more than max_samples={shape.max_samples} of its "
                         "static shape")
    cu_seqlens = padded_bounds(bounds, shape.max_documents, batch.cu_seqlens.dtype)
    return dataclasses.replace(batch, cu_seqlens=cu_seqlens,
                               layout=AttentionLayout.causal(Segments.static(cu_seqlens, width)),
                               pixel_values=padded_pixels(batch.pixel_values, shape.max_samples),
                               spans=[], slot_index=slot_indices(batch, shape.max_samples, rows * width))


def padded_bounds(bounds: Sequence[int], max_documents: int, dtype: torch.dtype) -> Tensor:
    """Document bounds [max_documents + 1]: `bounds` followed by empty documents at its end."""
    return torch.tensor(list(bounds) + [bounds[-1]] * (max_documents + 1 - len(bounds)), dtype=dtype)


def padded_pixels(pixel_values, max_samples: int):
    """pixel_values [S, ...] padded with blank samples to [max_samples, ...] (None stays None)."""
    if pixel_values is None:
        return None
    if not isinstance(pixel_values, Tensor):
        raise ValueError(f"static shapes need pixel_values as one tensor [samples, ...], got "
                         f"{type(pixel_values).__name__}")
    blank = pixel_values.new_zeros((max_samples - pixel_values.shape[0], *pixel_values.shape[1:]))
    return torch.cat([pixel_values, blank])


def slot_indices(batch: PackedBatch, max_samples: int, scratch: int) -> dict:
    """{kind: flat positions [max_samples * slots per sample * tokens]} by sample then slot, as the adapters
    emit their outputs; the padded samples' entries point at `scratch` (the row past the stream)."""
    out = {}
    samples = len(batch.sample_ids)
    for kind in sorted({s.kind for s in batch.spans}):
        ordered = spans_in_order(batch.spans, kind)
        per_sample, extra = divmod(len(ordered), samples)
        tokens = {s.length for s in ordered}
        if extra or len(tokens) != 1 or any(sum(s.sample == i for s in ordered) != per_sample
                                             for i in range(samples)):
            raise ValueError(f"static shapes need the same number of equally long {kind} slots in every sample")
        index = span_positions(ordered)
        size = max_samples * per_sample * tokens.pop()
        out[kind] = torch.cat([index, torch.full((size - index.numel(),), scratch, dtype=index.dtype)])
    return out

"""Static-shape DPO batches for CUDA-graph replay: the shared-prompt layout `[prompt, chosen, rejected]` at fixed sizes.

Besides what an SFT batch varies (see mrgfast.data.static_batch), a shared-prompt DPO batch varies its key stream
(each rejected answer gathers its prompt's keys again: layout.kv_index and seg_k), the scored answer tokens
(dpo_index, dpo_labels) and the pair count (dpo_cu_seqlens). `make_static_dpo` pads each to a run-wide size
(StaticDPOShape): query and key bounds with empty documents, kv_index with gathers whose keys no query sees, the
answer tokens with unlabelled ones past the last answer, and the pairs with empty pair slots that
`dpo_pair_mask` leaves out of the loss and the metrics. Precomputed reference log-probs are padded to the same slots
(`padded_pair_values`).
"""

import dataclasses
from typing import Sequence

import torch
from torch import Tensor

from mrgfast.data.packing import IGNORE_INDEX, PackedBatch
from mrgfast.data.static_batch import padded_bounds, padded_pixels, slot_indices
from mrgfast.layout import AttentionLayout, Segments

# The fewest tokens a pair takes: a prompt token and one token of each answer (DPOCollator refuses empty parts).
MIN_PAIR_TOKENS = 3


@dataclasses.dataclass(frozen=True)
class StaticDPOShape:
    """The sizes every DPO batch of a run is padded to: pair slots (also pixel_values' first dimension), attention
    documents (seg_q and seg_k have max_documents + 1 bounds), gathered keys and scored answer tokens."""

    max_pairs: int
    max_documents: int
    max_keys: int
    max_answer_tokens: int

    @classmethod
    def for_lengths(cls, lengths: Sequence[int], budget: int, rows: int) -> "StaticDPOShape":
        """Bounds that hold for any shared-prompt batch the packer makes from pairs of these token lengths
        (prompt + chosen + rejected): a row holds at most budget // shortest pairs, two documents each plus its
        padding tail; its prompts (gathered again as keys) and its answers each take less than the row."""
        if not lengths:
            raise ValueError("StaticDPOShape.for_lengths needs the dataset's pair lengths, got none")
        shortest = max(MIN_PAIR_TOKENS, min(min(lengths), budget))
        per_row = max(1, budget // shortest)
        # Each pair has at least one prompt token and one token per answer: prompts <= budget - 2, answers
        # <= budget - 1 per row. The key stream is thus always longer than the token stream (attention tells the
        # two layouts apart by that).
        return cls(max_pairs=rows * per_row, max_documents=rows * (2 * per_row + 1),
                   max_keys=rows * (2 * budget - 2), max_answer_tokens=rows * (budget - 1))

    @property
    def max_samples(self) -> int:
        """Samples (image sets) per batch: one per pair in the shared layout."""
        return self.max_pairs


def make_static_dpo(batch: PackedBatch, shape: StaticDPOShape) -> PackedBatch:
    """The host-side shared-prompt DPO batch at the sizes of `shape` (see module doc); ValueError naming the limit
    when the batch exceeds it, or for batches of another layout."""
    if batch.dpo_index is None or batch.layout is None or batch.layout.kv_index is None:
        raise ValueError("static DPO batches (cuda_graphs=true) need DPOCollator's shared layout "
                         "(dpo.layout=shared)")
    rows, width = batch.input_ids.shape
    layout = batch.layout
    pairs = (batch.dpo_cu_seqlens.numel() - 1) // 2
    check_fits("pairs", pairs, "max_pairs", shape.max_pairs)
    check_fits("attention documents", len(layout.seg_q.bounds) - 1, "max_documents", shape.max_documents)
    check_fits("gathered keys", layout.kv_index.numel(), "max_keys", shape.max_keys)
    check_fits("scored answer tokens", batch.dpo_index.numel(), "max_answer_tokens", shape.max_answer_tokens)
    cu_q = padded_bounds(layout.seg_q.bounds, shape.max_documents, batch.cu_seqlens.dtype)
    cu_k = padded_bounds(layout.seg_k.bounds, shape.max_documents, batch.cu_seqlens.dtype)
    # Padded gathers read token 0; their keys lie past seg_k's last bound, in no document, so no query sees them.
    kv_index = padded(layout.kv_index, shape.max_keys, 0)
    static_layout = AttentionLayout(Segments.static(cu_q, width), Segments.static(cu_k, width), kv_index)
    return dataclasses.replace(
        batch, cu_seqlens=cu_q, layout=static_layout, spans=[],
        pixel_values=padded_pixels(batch.pixel_values, shape.max_samples),
        slot_index=slot_indices(batch, shape.max_samples, rows * width),
        # Padded answer tokens are unlabelled and lie past the last answer bound: they score nothing.
        dpo_index=padded(batch.dpo_index, shape.max_answer_tokens, 0),
        dpo_labels=padded(batch.dpo_labels, shape.max_answer_tokens, IGNORE_INDEX),
        dpo_cu_seqlens=slotted_answer_bounds(batch.dpo_cu_seqlens, pairs, shape.max_pairs),
        dpo_pair_mask=torch.arange(shape.max_pairs) < pairs)


def check_fits(what: str, count: int, limit_name: str, limit: int) -> None:
    """ValueError naming the static shape's limit when `count` exceeds it."""
    if count > limit:
        raise ValueError(f"the batch has {count} {what}, more than {limit_name}={limit} of its static DPO shape")


def padded(values: Tensor, size: int, fill: int) -> Tensor:
    """1-D `values` extended to `size` entries with `fill`."""
    return torch.cat([values, values.new_full((size - values.numel(),), fill)])


def slotted_answer_bounds(cu_seqlens: Tensor, pairs: int, slots: int) -> Tensor:
    """Answer bounds [2 * slots + 1] of `pairs` chosen then `pairs` rejected answers, each half padded with empty
    answers to `slots`: the chosen slots come first, the rejected ones after, as fused_dpo_loss splits them."""
    if cu_seqlens.numel() - 1 != 2 * pairs:
        raise ValueError(f"dpo_cu_seqlens must bound 2 x {pairs} answers, got {cu_seqlens.numel() - 1}")
    slotted = padded_pair_values(cu_seqlens.diff(), slots)
    return torch.cat([cu_seqlens[:1], slotted.cumsum(0).to(cu_seqlens.dtype)])


def padded_pair_values(values: Tensor, slots: int) -> Tensor:
    """Per-answer values [2P] (chosen then rejected, e.g. precomputed reference log-probs) at the pair slots
    [2 * slots], zeros in the padded slots."""
    pairs = values.shape[0] // 2
    empty = values.new_zeros(slots - pairs)
    return torch.cat([values[:pairs], empty, values[pairs:], empty])

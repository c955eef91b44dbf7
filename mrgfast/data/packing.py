"""Packing: tokenized samples -> fixed-shape [rows, budget] micro-batches with cu_seqlens, positions and labels.

SFT batches pack whole samples (first-fit-decreasing) and close every row with a padding document, so the
token tensors keep one shape for CUDA graphs. DPO batches come in two layouts: "shared" packs each pair as
`[prompt, chosen, rejected]` with the prompt once (the rejected answer attends to the prompt through a
gathered key stream, see AttentionLayout), "padded" is TRL's: chosen and rejected as two full rows.
Either feeds `mrgfast.losses.fused_dpo_loss` through `PackedBatch.dpo_targets` and
`mrgfast.losses.dpo_loss_inputs`.
"""

import dataclasses
from collections import Counter
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from mrgfast.data.prompts import Span, TokenizedPair, TokenizedSample
from mrgfast.layout import AttentionLayout, OutputRows

IGNORE_INDEX = -100
OVERFLOW = ("truncate", "error")
DPO_LAYOUTS = ("shared", "padded")


# ----------------------------------------------------------------------------------------------- bin packing

def first_fit_decreasing(lengths: Sequence[int], budget: int) -> List[List[int]]:
    """Indices of `lengths` grouped into rows of at most `budget` tokens: longest first, each into the first
    row it fits (ties keep index order, so the result is deterministic)."""
    check_budget(budget)
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows, free = [], []
    for i in order:
        n = int(lengths[i])
        if n > budget:
            raise ValueError(f"item {i} has {n} tokens, more than the budget of {budget}")
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(budget - n)
    return rows


def plan_batches(lengths: Sequence[int], budget: int, rows: int, seed: int = 0, epoch: int = 0,
                 shuffle: bool = True, window: Optional[int] = None) -> List[List[int]]:
    """Sample indices grouped into micro-batches that each pack into `rows` rows of `budget` tokens.

    Deterministic given (seed, epoch): the sample order is shuffled, cut into windows of `window` samples
    (all at once by default), packed first-fit-decreasing per window, consecutive rows grouped `rows` at a
    time, and the batch order shuffled. Samples longer than the budget count as a full row (the collator
    truncates them). Every group is checked to repack into `rows` rows, as the collator will pack it.
    """
    check_budget(budget)
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist() if shuffle else list(range(len(lengths)))
    capped = [min(int(n), budget) for n in lengths]
    window = len(order) if window is None else window
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        bins = [[chunk[i] for i in row] for row in first_fit_decreasing([capped[i] for i in chunk], budget)]
        group = []
        for row in bins:
            if group and len(first_fit_decreasing([capped[i] for i in group + row], budget)) > rows:
                batches.append(group)
                group = []
            group = group + row
        if group:
            batches.append(group)
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class PackedBatchSampler(torch.utils.data.Sampler):
    """A DataLoader batch_sampler yielding plan_batches groups; call set_epoch(e) for each epoch's draw."""

    def __init__(self, lengths: Sequence[int], budget: int, rows: int, seed: int = 0, shuffle: bool = True,
                 window: Optional[int] = None):
        self.lengths, self.budget, self.rows = list(lengths), budget, rows
        self.seed, self.shuffle, self.window, self.epoch = seed, shuffle, window, 0

    def set_epoch(self, epoch: int) -> None:
        """Use the draw of `epoch` next."""
        self.epoch = epoch

    def batches(self) -> List[List[int]]:
        """This epoch's groups of sample indices."""
        return plan_batches(self.lengths, self.budget, self.rows, self.seed, self.epoch, self.shuffle, self.window)

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def check_budget(budget: int) -> None:
    """ValueError unless budget is a positive int."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive number of tokens, got {budget!r}")


# ------------------------------------------------------------------------------------- per-sample sequences

def sequence_positions(length: int, spans: Sequence[Span], mrope: bool) -> Tensor:
    """Position ids of one sequence: [L] counting 0.., or for M-RoPE [3, L] as transformers' Qwen2-VL
    get_rope_index gives them (text advances all three axes; an image grid (t, h, w) starting at position p
    gets (p + t_i, p + h_i, p + w_i), and the text after it resumes at p + max(h, w))."""
    if not mrope:
        return torch.arange(length)
    pieces, pos, cursor = [], 0, 0
    for span in sorted((s for s in spans if s.grid is not None), key=lambda s: s.start):
        text = span.start - cursor
        pieces.append(torch.arange(text).expand(3, -1) + pos)
        pos += text
        t, h, w = span.grid
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        pieces.append(grid.reshape(3, -1) + pos)
        pos += max(h, w)
        cursor = span.start + span.length
    pieces.append(torch.arange(length - cursor).expand(3, -1) + pos)
    return torch.cat(pieces, dim=1)


def shifted_labels(input_ids: Sequence[int], label_mask: Sequence[bool]) -> list:
    """Labels aligned with the inputs for the fused loss: position t holds token t+1 when it is supervised."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for t in range(len(input_ids) - 1):
        if label_mask[t + 1]:
            labels[t] = input_ids[t + 1]
    return labels


@dataclasses.dataclass
class Document:
    """One packed sample before placement: ids, shifted labels, positions [L] or [3, L], spans, sample id."""

    ids: list
    labels: list
    positions: Tensor
    spans: tuple
    sample_id: str

    @classmethod
    def of(cls, sample: TokenizedSample, mrope: bool) -> "Document":
        """The document of a tokenized sample."""
        return cls(list(sample.input_ids), shifted_labels(sample.input_ids, sample.label_mask),
                   sequence_positions(len(sample.input_ids), sample.spans, mrope), tuple(sample.spans),
                   sample.sample_id)

    def truncated(self, budget: int) -> "Document":
        """The first `budget` tokens; the last kept position still predicts the first cut token. ValueError if
        the cut would split or drop a placeholder span (the adapter produces its tokens whole, for every image)."""
        for span in self.spans:
            if span.start + span.length > budget:
                raise ValueError(f"sample {self.sample_id!r}: the token budget {budget} cuts through its {span.kind} "
                                 f"placeholder at {span.start}..{span.start + span.length}; raise the budget")
        return Document(self.ids[:budget], self.labels[:budget], self.positions[..., :budget], self.spans,
                        self.sample_id)


# ------------------------------------------------------------------------------------------------- batches

@dataclasses.dataclass
class PlacedSpan:
    """A placeholder span in a packed batch: kind, the sample it belongs to (index into sample_ids), which
    image/slot of that sample, its first flat position in the [rows * budget] stream, length, grid."""

    kind: str
    sample: int
    index: int
    start: int
    length: int
    grid: Optional[tuple] = None


def spans_in_order(spans: Sequence[PlacedSpan], kind: str) -> list:
    """The `kind` spans by sample then image/slot: the order the adapter's outputs come in."""
    return sorted((s for s in spans if s.kind == kind), key=lambda s: (s.sample, s.index))


def span_positions(ordered: Sequence[PlacedSpan]) -> Tensor:
    """Flat positions [n] (CPU, int64) of every token of `ordered` spans, in that order."""
    if not ordered:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(s.start, s.start + s.length) for s in ordered])


@dataclasses.dataclass
class PackedBatch:
    """One fixed-shape micro-batch. Token tensors are [rows, budget] (position_ids [3, rows, budget] for M-RoPE).

    labels are shifted (position t holds token t+1, IGNORE_INDEX elsewhere); cu_seqlens (int32) marks the
    documents of the flattened stream, each row's padding tail being a document of its own; sample_index
    says which sample (index into sample_ids) each token belongs to, -1 for padding. DPO batches add
    `layout` (shared prompts) and dpo_index/dpo_labels/dpo_cu_seqlens: the flat positions that predict
    each chosen then each rejected completion token, the tokens, and the 2P sequence bounds (see
    dpo_targets). `slot_index` replaces `spans` in static batches (see make_static). `loss_rows`, when
    set (mrgfast.training.steps.prepare builds it on the host), are the rows the SFT loss reads, from each
    document's first supervised position to its end: the decoder returns only their hidden states (its last
    block and the LM head run on them alone).
    """

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    sample_index: Tensor
    sample_ids: list
    spans: list
    num_tokens: int
    truncated: int = 0
    pixel_values: object = None
    layout: Optional[AttentionLayout] = None
    dpo_index: Optional[Tensor] = None
    dpo_labels: Optional[Tensor] = None
    dpo_cu_seqlens: Optional[Tensor] = None
    loss_rows: Optional[OutputRows] = None
    slot_index: Optional[dict] = None   # static batches (mrgfast.data.static_batch): {kind: flat positions}
    dpo_pair_mask: Optional[Tensor] = None  # static DPO batches (mrgfast.data.static_dpo): the real pair slots
    image_digests: Optional[list] = None  # per sample, of its pixel_values (host): the feature cache's keys

    @property
    def padding_fraction(self) -> float:
        """Share of the batch's token slots holding padding."""
        return 1.0 - self.num_tokens / self.input_ids.numel()

    def trimmed(self) -> "PackedBatch":
        """The host-side batch cut to its widest row's real tokens: the padding past every row's last sample is
        never computed on. Only where shapes may vary (eager steps; a CUDA graph replays [rows, budget]);
        DPO batches (flat pair indices, shared-prompt layouts) are returned as they are."""
        if self.dpo_index is not None or self.layout is not None:
            return self
        rows, budget = self.input_ids.shape
        real = self.sample_index >= 0
        used = [int(row.nonzero()[-1]) + 1 if row.any() else 0 for row in real]
        width = max(max(used), 1)
        if width == budget:
            return self
        bounds, cut = self.cu_seqlens.tolist(), [0]
        for row, n in enumerate(used):
            # A row's documents end where its last sample does; its padding tail shrinks to the new width.
            cut += [row * width + b - row * budget for b in bounds[1:] if row * budget < b <= row * budget + n]
            if n < width:
                cut.append((row + 1) * width)
        spans = [dataclasses.replace(s, start=s.start // budget * width + s.start % budget) for s in self.spans]
        return dataclasses.replace(self, input_ids=self.input_ids[:, :width].contiguous(),
                                   labels=self.labels[:, :width].contiguous(),
                                   position_ids=self.position_ids[..., :width].contiguous(),
                                   cu_seqlens=torch.tensor(cut, dtype=self.cu_seqlens.dtype),
                                   sample_index=self.sample_index[:, :width].contiguous(), spans=spans)

    def dpo_targets(self, hidden: Tensor) -> tuple:
        """(dpo_index, dpo_labels, dpo_cu_seqlens) on `hidden`'s device, for mrgfast.losses.dpo_loss_inputs; ValueError
        unless this is a DPOCollator batch and `hidden` [rows, budget, D] is the decoder's output on it."""
        if self.dpo_index is None:
            raise ValueError("dpo_targets needs a batch from DPOCollator (this one has no dpo_index)")
        if hidden.shape[:-1] != self.input_ids.shape:
            raise ValueError(f"hidden must be [{', '.join(map(str, self.input_ids.shape))}, D] like the batch's "
                             f"input_ids, got {tuple(hidden.shape)}")
        return tuple(t.to(hidden.device) for t in (self.dpo_index, self.dpo_labels, self.dpo_cu_seqlens))

    def attention_documents(self) -> list:
        """(queries, keys) of each document holding real tokens, from the host bounds (padding documents left out):
        the attention this batch must compute. Host-side batches only (before prepare)."""
        if self.layout is not None:  # DPO's shared prompts: rejected answers attend to [prompt, rejected]
            bounds, keys = self.layout.seg_q.bounds, self.layout.seg_k.lengths
        else:
            bounds, keys = self.cu_seqlens.tolist(), None
        # Whether each document's first token is a sample's: read at the document starts only, not every token
        # (this runs on the host every step). A trailing empty document may start at the stream's end.
        flat = self.sample_index.reshape(-1)
        starts = torch.tensor(bounds[:-1], dtype=torch.long).clamp(max=max(flat.numel() - 1, 0))
        real = (flat[starts] >= 0).tolist() if flat.numel() else [False] * len(starts)
        documents = []
        for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
            if end > start and real[index]:
                documents.append((end - start, end - start if keys is None else keys[index]))
        return documents

    def span_index(self, kind: str) -> Tensor:
        """Flat positions [n] of every `kind` placeholder token, by sample then image/slot: where the adapter's
        outputs for the batch's samples (in sample_ids order), flattened, are written into the embeddings."""
        return span_positions(spans_in_order(self.spans, kind)).to(self.input_ids.device)

    def decoder_inputs(self) -> dict:
        """Keyword arguments of Decoder.forward besides the tokens: position_ids, cu_seqlens or layout, and
        output_rows when the batch has loss_rows."""
        out = dict(position_ids=self.position_ids)
        if self.layout is not None:
            out["layout"] = self.layout
        else:
            out["cu_seqlens"] = self.cu_seqlens
        if self.loss_rows is not None:
            out["output_rows"] = self.loss_rows
        return out

    def to(self, device) -> "PackedBatch":
        """The batch with its tensors on `device`."""
        moved = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, (Tensor, AttentionLayout, OutputRows)):
                value = value.to(device)
            elif isinstance(value, dict):
                value = {k: v.to(device) for k, v in value.items()}
            moved[field.name] = value
        return PackedBatch(**moved)


class BatchWriter:
    """Places documents into [rows, budget] tensors and records the documents of the flattened stream."""

    def __init__(self, rows: int, budget: int, pad_token_id: int, mrope: bool):
        self.rows, self.budget = rows, budget
        self.input_ids = torch.full((rows, budget), pad_token_id, dtype=torch.long)
        self.labels = torch.full((rows, budget), IGNORE_INDEX, dtype=torch.long)
        self.positions = torch.zeros((3, rows, budget) if mrope else (rows, budget), dtype=torch.long)
        self.sample_index = torch.full((rows, budget), -1, dtype=torch.long)
        self.fill = [0] * rows
        self.q_lengths, self.k_lengths, self.kv_index = [], [], []
        self.sample_ids, self.spans, self.num_tokens = [], [], 0
        self.closed = 0  # rows closed so far

    def place(self, row: int, ids, labels, positions: Tensor, sample: int) -> int:
        """Write tokens at the end of `row`; returns their first flat position."""
        if row != self.closed:
            raise ValueError(f"rows are filled in order: row {self.closed} is open, got row {row}")
        start, n = self.fill[row], len(ids)
        if start + n > self.budget:
            raise ValueError(f"row {row}: {start + n} tokens exceed the budget {self.budget}")
        self.input_ids[row, start:start + n] = torch.as_tensor(ids, dtype=torch.long)
        self.labels[row, start:start + n] = torch.as_tensor(labels, dtype=torch.long)
        self.positions[..., row, start:start + n] = positions
        self.sample_index[row, start:start + n] = sample
        self.fill[row] += n
        self.num_tokens += n
        return row * self.budget + start

    def document(self, queries: int, keys: Sequence[int]) -> None:
        """Record a document of `queries` query tokens attending to the flat key positions `keys`."""
        self.q_lengths.append(queries)
        self.k_lengths.append(len(keys))
        self.kv_index.extend(keys)

    def add_sample(self, sample_id: str, spans: Sequence[Span], flat_start: int) -> int:
        """Register a sample and its spans (positions relative to flat_start); returns its sample index."""
        index = len(self.sample_ids)
        self.sample_ids.append(sample_id)
        for span in spans:
            self.spans.append(PlacedSpan(span.kind, index, span.index, flat_start + span.start, span.length,
                                         span.grid))
        return index

    def put_document(self, row: int, doc: Document) -> None:
        """Place a whole document as one causal attention document."""
        sample = len(self.sample_ids)
        start = self.place(row, doc.ids, doc.labels, doc.positions, sample)
        self.add_sample(doc.sample_id, doc.spans, start)
        self.document(len(doc.ids), range(start, start + len(doc.ids)))

    def close_row(self, row: int) -> None:
        """Turn the row's free tail into a padding document (positions 0.., attends only to itself). Rows are
        filled and closed in order, so documents are recorded in stream order."""
        if row != self.closed:
            raise ValueError(f"rows must be closed in order: expected row {self.closed}, got {row}")
        tail = self.budget - self.fill[row]
        if tail:
            start = row * self.budget + self.fill[row]
            self.positions[..., row, self.fill[row]:] = torch.arange(tail)
            self.fill[row] = self.budget
            self.document(tail, range(start, start + tail))
        self.closed += 1

    def cu_seqlens(self, max_documents: Optional[int]) -> Tensor:
        """int32 document bounds of the flattened stream; with max_documents, padded with empty documents to
        max_documents + 1 entries so its shape is static too."""
        bounds = np.concatenate([[0], np.cumsum(self.q_lengths)]).astype(np.int32)
        if max_documents is not None:
            if len(self.q_lengths) > max_documents:
                raise ValueError(f"the batch has {len(self.q_lengths)} documents (padding tails included), more than "
                                 f"max_documents={max_documents}")
            bounds = np.concatenate([bounds, np.full(max_documents - len(self.q_lengths), bounds[-1], np.int32)])
        return torch.from_numpy(bounds)

    def layout(self) -> AttentionLayout:
        """The AttentionLayout of the recorded documents and their key gathers."""
        return AttentionLayout.from_lengths(self.q_lengths, self.k_lengths, self.kv_index, "cpu")

    def batch(self, max_documents: Optional[int] = None, with_layout: bool = False, **extra) -> PackedBatch:
        """The PackedBatch of everything placed (closing the rows not closed yet), with its AttentionLayout
        when `with_layout`."""
        for row in range(self.closed, self.rows):
            self.close_row(row)
        if with_layout:
            extra["layout"] = self.layout()
        return PackedBatch(self.input_ids, self.labels, self.positions, self.cu_seqlens(max_documents),
                           self.sample_index, self.sample_ids, self.spans, self.num_tokens, **extra)


def tokenized(items, builder, pairs: bool) -> list:
    """Items as TokenizedSample (TokenizedPair when `pairs`), through `builder` unless already tokenized."""
    kind = TokenizedPair if pairs else TokenizedSample
    out = []
    for item in items:
        if isinstance(item, kind):
            out.append(item)
        elif builder is None:
            raise ValueError(f"got a {type(item).__name__}, not a {kind.__name__}: give the collator a PromptBuilder")
        else:
            out.append(builder.pair(item) if pairs else builder(item))
    return out


def stack_pixels(items, order: Sequence[int]):
    """Items' pixel_values in packed sample order: one tensor when they share a shape, else a list; None if
    the items carry none."""
    pixels = [items[i].get("pixel_values") if isinstance(items[i], dict) else None for i in order]
    if any(p is None for p in pixels):
        return None
    if all(p.shape == pixels[0].shape for p in pixels):
        return torch.stack(pixels)
    return pixels


class PackingStats:
    """Cumulative counts of a collator: batches, samples, real tokens, token slots, truncated samples."""

    def __init__(self):
        self.counts = Counter()

    def add(self, batch: PackedBatch, samples: int) -> None:
        """Count one batch."""
        self.counts.update(batches=1, samples=samples, tokens=batch.num_tokens, slots=batch.input_ids.numel(),
                           truncated=batch.truncated)

    @property
    def padding_fraction(self) -> float:
        """Share of all token slots so far that held padding (0 before the first batch)."""
        slots = self.counts["slots"]
        return 1.0 - self.counts["tokens"] / slots if slots else 0.0


class PackingCollator:
    """SFT collator: samples -> one PackedBatch of `rows` x `budget` tokens, first-fit-decreasing.

    Items are TokenizedSamples, or Samples / MedicalDataset items turned into them by `builder` (a
    PromptBuilder, which also gives the pad id and whether positions are M-RoPE). A sample longer than the
    budget is cut to it and counted (`overflow="truncate"`), or rejected (`overflow="error"`). Items that do
    not fit `rows` rows raise; group samples with plan_batches / PackedBatchSampler. `stats` accumulates the
    padding fraction across batches.
    """

    def __init__(self, budget: int, rows: int = 1, builder=None, pad_token_id: Optional[int] = None,
                 mrope: Optional[bool] = None, overflow: str = "truncate", max_documents: Optional[int] = None):
        check_budget(budget)
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        if overflow not in OVERFLOW:
            raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
        self.budget, self.rows, self.builder, self.overflow, self.max_documents = (budget, rows, builder, overflow,
                                                                                   max_documents)
        self.pad_token_id = pad_token_id if pad_token_id is not None else (
            builder.tokenizer.pad_token_id if builder is not None else None)
        if self.pad_token_id is None:
            raise ValueError("PackingCollator needs pad_token_id (or a builder whose tokenizer has a pad/eos token)")
        self.mrope = mrope if mrope is not None else (builder is not None and builder.template.mrope)
        self.stats = PackingStats()

    def __call__(self, items) -> PackedBatch:
        """Pack `items` into one batch."""
        docs, truncated = [], 0
        for sample in tokenized(items, self.builder, pairs=False):
            doc = Document.of(sample, self.mrope)
            if len(doc.ids) > self.budget:
                if self.overflow == "error":
                    raise ValueError(f"sample {doc.sample_id!r} has {len(doc.ids)} tokens, more than the budget of "
                                     f"{self.budget} (overflow='error')")
                doc, truncated = doc.truncated(self.budget), truncated + 1
            docs.append(doc)
        bins = first_fit_decreasing([len(d.ids) for d in docs], self.budget)
        if len(bins) > self.rows:
            raise ValueError(f"{len(docs)} samples need {len(bins)} rows of {self.budget} tokens, the collator packs "
                             f"{self.rows}; group samples with plan_batches / PackedBatchSampler")
        writer = BatchWriter(self.rows, self.budget, self.pad_token_id, self.mrope)
        order = [i for row in bins for i in row]
        for row, members in enumerate(bins):
            for i in members:
                writer.put_document(row, docs[i])
            writer.close_row(row)
        batch = writer.batch(self.max_documents, truncated=truncated, pixel_values=stack_pixels(items, order))
        self.stats.add(batch, len(docs))
        return batch


# ---------------------------------------------------------------------------------------------------- DPO

def check_pair(pair: TokenizedPair) -> None:
    """ValueError unless the pair has a prompt (its last token predicts each answer's first) and two answers."""
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        if not getattr(pair, name):
            raise ValueError(f"preference pair {pair.sample_id!r}: {name} is empty")


class DPOCollator:
    """Preference pairs -> one PackedBatch in the "shared" or "padded" layout, ready for dpo_loss_inputs.

    "shared": `rows` x `budget` tokens, each pair packed as `[prompt, chosen, rejected]` (first-fit-
    decreasing by pair length); the rejected answer's keys are `[prompt, rejected]` and its positions
    continue from the prompt's end, so it sees exactly what it would see after the prompt alone.
    "padded": TRL's layout, 2P rows of `budget` tokens, P chosen sequences then P rejected ones (`rows` unused;
    each pair's images appear twice, as TRL runs them).
    Pairs longer than a row raise (a cut DPO answer would change its log-prob). The token tensors have a
    static shape; the shared layout's key stream (layout.kv_index) and the dpo_* tensors grow with the
    prompt and answer lengths of the batch (mrgfast.data.static_dpo pads them to a run-wide size).
    """

    def __init__(self, budget: int, rows: int = 1, layout: str = "shared", builder=None,
                 pad_token_id: Optional[int] = None, mrope: Optional[bool] = None):
        if layout not in DPO_LAYOUTS:
            raise ValueError(f"layout must be one of {DPO_LAYOUTS}, got {layout!r}")
        self.layout = layout
        # The SFT collator's argument checks and defaults apply unchanged.
        self.base = PackingCollator(budget, rows, builder, pad_token_id, mrope)
        self.stats = self.base.stats

    def __call__(self, items) -> PackedBatch:
        """Pack `items` (TokenizedPairs, or preference Samples / items through the builder) into one batch."""
        pairs = tokenized(items, self.base.builder, pairs=True)
        for pair in pairs:
            check_pair(pair)
        batch, order = self.shared(pairs) if self.layout == "shared" else self.padded(pairs)
        batch.pixel_values = stack_pixels(items, order)
        self.stats.add(batch, len(pairs))
        return batch

    def shared(self, pairs: List[TokenizedPair]):
        """(the shared-prompt batch, the pair index of each of its samples)."""
        base = self.base
        units = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
        for pair, n in zip(pairs, units):
            if n > base.budget:
                raise ValueError(f"preference pair {pair.sample_id!r} takes {n} tokens, more than the budget of "
                                 f"{base.budget}")
        bins = first_fit_decreasing(units, base.budget)
        if len(bins) > base.rows:
            raise ValueError(f"{len(pairs)} pairs need {len(bins)} rows of {base.budget} tokens, the collator packs "
                             f"{base.rows}")
        writer = BatchWriter(base.rows, base.budget, base.pad_token_id, base.mrope)
        chosen, rejected = [], []
        for row, members in enumerate(bins):
            for i in members:
                c, r = self.place_shared(writer, row, pairs[i])
                chosen.append(c)
                rejected.append(r)
            writer.close_row(row)
        order = [i for members in bins for i in members]
        return writer.batch(with_layout=True, **dpo_fields(chosen, rejected)), order

    def place_shared(self, writer: BatchWriter, row: int, pair: TokenizedPair):
        """Write `[prompt, chosen, rejected]` and its two attention documents; returns the (positions, tokens)
        that score the chosen and the rejected answer."""
        n_p, n_c, n_r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        with_chosen, with_rejected = pair.full("chosen"), pair.full("rejected")
        pos_c = sequence_positions(len(with_chosen), pair.spans, self.base.mrope)
        pos_r = sequence_positions(len(with_rejected), pair.spans, self.base.mrope)[..., n_p:]
        # In-place labels carry the chosen answer only (an SFT term on it, if wanted); DPO reads dpo_labels.
        labels = shifted_labels(with_chosen.input_ids, with_chosen.label_mask) + [IGNORE_INDEX] * n_r
        sample = len(writer.sample_ids)
        start = writer.place(row, with_chosen.input_ids + pair.rejected_ids, labels,
                             torch.cat([pos_c, pos_r], dim=-1), sample)
        writer.add_sample(pair.sample_id, pair.spans, start)
        prompt = list(range(start, start + n_p))
        writer.document(n_p + n_c, range(start, start + n_p + n_c))
        writer.document(n_r, prompt + list(range(start + n_p + n_c, start + n_p + n_c + n_r)))
        last_prompt = start + n_p - 1
        chosen = ([last_prompt + j for j in range(n_c)], pair.chosen_ids)
        rejected = ([last_prompt] + [start + n_p + n_c + j for j in range(n_r - 1)], pair.rejected_ids)
        return chosen, rejected

    def padded(self, pairs: List[TokenizedPair]):
        """(TRL's layout: P chosen rows then P rejected rows, each one sequence and its padding; the pair index
        of each of its 2P samples)."""
        base = self.base
        writer = BatchWriter(2 * len(pairs), base.budget, base.pad_token_id, base.mrope)
        chosen, rejected = [], []
        for which, scored in (("chosen", chosen), ("rejected", rejected)):
            for i, pair in enumerate(pairs):
                sample = pair.full(which)
                if len(sample) > base.budget:
                    raise ValueError(f"preference pair {pair.sample_id!r}: prompt + {which} takes {len(sample)} "
                                     f"tokens, more than the budget of {base.budget}")
                row = i if which == "chosen" else len(pairs) + i
                doc = Document.of(sample, base.mrope)
                start = row * base.budget
                writer.put_document(row, doc)
                if which == "rejected":
                    writer.labels[row] = IGNORE_INDEX  # as in the shared layout: in-place labels are chosen's
                n_p = len(pair.prompt_ids)
                completion = pair.chosen_ids if which == "chosen" else pair.rejected_ids
                scored.append(([start + n_p - 1 + j for j in range(len(completion))], completion))
                writer.close_row(row)
        return writer.batch(**dpo_fields(chosen, rejected)), list(range(len(pairs))) * 2


def dpo_fields(chosen: list, rejected: list) -> dict:
    """dpo_index / dpo_labels / dpo_cu_seqlens from (positions, tokens) of each chosen then each rejected answer."""
    scored = chosen + rejected
    index = [p for positions, _ in scored for p in positions]
    labels = [t for _, tokens in scored for t in tokens]
    bounds = np.concatenate([[0], np.cumsum([len(tokens) for _, tokens in scored])]).astype(np.int32)
    return dict(dpo_index=torch.tensor(index, dtype=torch.long), dpo_labels=torch.tensor(labels, dtype=torch.long),
                dpo_cu_seqlens=torch.from_numpy(bounds))

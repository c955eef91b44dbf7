"""Packing: bin packing and batch plans, the SFT collator's tensors, M-RoPE positions against transformers, and
the decoder on packed SFT and shared-prompt DPO batches against the same samples run one by one."""

import dataclasses

import numpy as np
import pytest
import torch

from mrgfast.data.packing import (DPOCollator, PackedBatchSampler, PackingCollator, first_fit_decreasing,
                                  plan_batches, sequence_positions, shifted_labels)
from mrgfast.data.prompts import PromptBuilder, TokenizedSample
from mrgfast.data.synthetic import demo_samples
from mrgfast.data.tokenizer import build_demo_tokenizer
from mrgfast.losses import dpo_loss_inputs, dpo_sequence_logps, fused_dpo_loss
from mrgfast.layout import AttentionLayout
from mrgfast.models import Decoder, DecoderConfig
from mrgfast.ops.linear_cross_entropy import linear_cross_entropy
from tests.data.test_tokenizer import demo_texts

FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tok(demo_dir, tmp_path_factory):
    """The demo tokenizer."""
    return build_demo_tokenizer(demo_texts(demo_dir), tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def reports(demo_dir):
    """Report samples of the demo's train split."""
    return list(demo_samples(demo_dir, "report", "train"))


@pytest.fixture(scope="module")
def pairs_samples(demo_dir):
    """Preference samples of the demo's train split."""
    return list(demo_samples(demo_dir, "preference", "train"))


def tiny_decoder(vocab: int, mrope: bool, seed: int = 0) -> Decoder:
    """A random 2-layer GQA decoder; M-RoPE splits its 8 frequencies 2/3/3 as the tiny Qwen2-VL does."""
    torch.manual_seed(seed)
    config = DecoderConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, qkv_bias=True,
                           mrope_section=(2, 3, 3) if mrope else None)
    decoder = Decoder(config)
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(0, 0.2)  # larger than default: peaked scores, so wrong masks show up clearly
    return decoder


def builder_for(tok, mrope: bool) -> PromptBuilder:
    """Qwen2-VL's chat format with one image grid (M-RoPE), or PeFoMed's with 3 image tokens."""
    if mrope:
        return PromptBuilder(tok, "qwen2_vl", image_tokens=(1, 2, 3))
    return PromptBuilder(tok, "pefomed", image_tokens=3)


def alone(decoder: Decoder, sample: TokenizedSample, mrope: bool) -> torch.Tensor:
    """Full-vocabulary log-probs [L, V] of one sequence run alone (no packing), positions as the collator's."""
    positions = sequence_positions(len(sample), sample.spans, mrope)
    hidden = decoder(input_ids=torch.tensor([sample.input_ids]), position_ids=positions[..., None, :])
    return decoder.compute_logits(hidden[0]).float().log_softmax(-1)


def answer_logp(logp: torch.Tensor, sample: TokenizedSample) -> torch.Tensor:
    """Summed log-prob of the supervised tokens: position t-1 predicts token t (the naive shift)."""
    ids = torch.tensor(sample.input_ids)
    mask = torch.tensor(sample.label_mask)[1:]
    token = logp[:-1].gather(-1, ids[1:, None]).squeeze(-1)
    return (token * mask).sum()


def grads(decoder: Decoder) -> dict:
    """Parameter gradients by name, then cleared."""
    out = {n: p.grad.clone() for n, p in decoder.named_parameters()}
    decoder.zero_grad()
    return out


# ----------------------------------------------------------------------------------------------- planning

def test_first_fit_decreasing_packs_every_item_once_within_budget():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 65, size=int(rng.integers(1, 40))).tolist()
        rows = first_fit_decreasing(lengths, 64)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
        assert len(rows) <= 11 / 9 * -(-sum(lengths) // 64) + 1  # FFD's bound over the optimum's lower bound
        assert rows == first_fit_decreasing(lengths, 64)
    assert first_fit_decreasing([7, 1, 5, 3], 8) == [[0, 1], [2, 3]]  # tight: two full rows
    with pytest.raises(ValueError, match="item 1 has 9 tokens, more than the budget of 8"):
        first_fit_decreasing([3, 9], 8)
    with pytest.raises(ValueError, match="budget must be a positive number of tokens"):
        first_fit_decreasing([3], 0)


def test_plan_batches_is_deterministic_and_every_group_fits():
    lengths = np.random.default_rng(1).integers(5, 80, size=57).tolist() + [200]  # one sample over the budget
    plan = plan_batches(lengths, 64, rows=3, seed=7, epoch=0)
    assert sorted(i for group in plan for i in group) == list(range(len(lengths)))
    capped = [min(n, 64) for n in lengths]
    assert all(len(first_fit_decreasing([capped[i] for i in group], 64)) <= 3 for group in plan)
    assert plan == plan_batches(lengths, 64, rows=3, seed=7, epoch=0)
    assert plan != plan_batches(lengths, 64, rows=3, seed=7, epoch=1)
    windowed = plan_batches(lengths, 64, rows=3, shuffle=False, window=10)
    assert sorted(i for group in windowed for i in group) == list(range(len(lengths)))
    assert all(min(group) // 10 == max(group) // 10 for group in windowed)  # no batch mixes two windows
    sampler = PackedBatchSampler(lengths, 64, 3, seed=7)
    assert list(sampler) == plan and len(sampler) == len(plan)
    sampler.set_epoch(1)
    assert list(sampler) == plan_batches(lengths, 64, rows=3, seed=7, epoch=1)


# ------------------------------------------------------------------------------------------ SFT collator

def test_collator_places_samples_as_documents(tok, reports):
    builder = PromptBuilder(tok, "pefomed", image_tokens=4)
    tokenized = [builder(s) for s in reports[:6]]
    budget = 2 * max(len(t) for t in tokenized) + 5  # two per row: 3 rows used, the 4th all padding
    collator = PackingCollator(budget, rows=4, builder=builder)
    items = [{"id": s.id, "task": s.task, "prompt": s.prompt, "answer": s.answer,
              "pixel_values": torch.full((2, 1, 2, 2), float(i))} for i, s in enumerate(reports[:6])]
    batch = collator(items)
    assert batch.input_ids.shape == batch.labels.shape == batch.position_ids.shape == (4, budget)
    assert batch.cu_seqlens.dtype == torch.int32
    bounds = batch.cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == 4 * budget
    assert all(r * budget in bounds for r in range(4))  # no document crosses a row
    flat_ids, flat_labels = batch.input_ids.reshape(-1), batch.labels.reshape(-1)
    flat_pos, owner = batch.position_ids.reshape(-1), batch.sample_index.reshape(-1)
    ids = [s.id for s in reports[:6]]
    for index, sample_id in enumerate(batch.sample_ids):
        expected = tokenized[ids.index(sample_id)]
        where = (owner == index).nonzero().squeeze(-1)
        start, n = int(where[0]), len(expected)
        assert where.tolist() == list(range(start, start + n))  # contiguous
        assert start in bounds and start + n in bounds  # one document
        assert flat_ids[where].tolist() == expected.input_ids
        assert flat_labels[where].tolist() == shifted_labels(expected.input_ids, expected.label_mask)
        assert flat_pos[where].tolist() == list(range(n))
        assert torch.equal(batch.pixel_values[index], items[ids.index(sample_id)]["pixel_values"])
    padding = owner == -1
    assert (flat_labels[padding] == -100).all() and (flat_ids[padding] == tok.pad_token_id).all()
    assert batch.padding_fraction == pytest.approx(float(padding.float().mean()))
    assert batch.num_tokens == sum(len(t) for t in tokenized)
    image = batch.span_index("image")
    assert image.numel() == 4 * 6 and (flat_ids[image] == tok.token_to_id("<ImageHere>")).all()
    assert owner[image].tolist() == [i for i in range(6) for _ in range(4)]  # sample order, as features come
    # What attention must compute: the six samples, each a document of its own; padding documents left out.
    assert sorted(batch.attention_documents()) == sorted((len(t), len(t)) for t in tokenized)
    second = collator(items[:2])
    total = batch.input_ids.numel() + second.input_ids.numel()
    assert collator.stats.padding_fraction == pytest.approx(
        1 - (batch.num_tokens + second.num_tokens) / total)
    assert collator.stats.counts["batches"] == 2 and collator.stats.counts["samples"] == 8


def test_static_document_count_truncation_and_errors(tok, reports):
    builder = PromptBuilder(tok, "pefomed", image_tokens=4)
    sample = builder(reports[0])
    fixed = PackingCollator(len(sample) + 5, rows=2, builder=builder, max_documents=6)([reports[0]])
    assert fixed.cu_seqlens.tolist() == [0, len(sample), len(sample) + 5, 2 * (len(sample) + 5)] + [
        2 * (len(sample) + 5)] * 3
    with pytest.raises(ValueError, match="the batch has 3 documents .* more than max_documents=2"):
        PackingCollator(len(sample) + 5, rows=2, builder=builder, max_documents=2)([reports[0]])
    cut = len(sample) - 3
    collator = PackingCollator(cut, rows=1, builder=builder)
    batch = collator([reports[0]])
    assert batch.truncated == 1 and collator.stats.counts["truncated"] == 1 and batch.padding_fraction == 0
    assert batch.input_ids[0].tolist() == sample.input_ids[:cut]
    # The last kept position still predicts the first token that was cut.
    assert batch.labels[0].tolist() == shifted_labels(sample.input_ids, sample.label_mask)[:cut]
    assert batch.labels[0, -1] == sample.input_ids[cut]
    with pytest.raises(ValueError, match=f"sample '{reports[0].id}' has {len(sample)} tokens, more than the budget"):
        PackingCollator(cut, builder=builder, overflow="error")([reports[0]])
    inside = sample.spans[0].start + 2
    with pytest.raises(ValueError, match=f"the token budget {inside} cuts through its image placeholder"):
        PackingCollator(inside, builder=builder)([reports[0]])
    with pytest.raises(ValueError, match="need 2 rows of .* the collator packs 1; group samples with plan_batches"):
        PackingCollator(len(sample), rows=1, builder=builder)([reports[0], reports[0]])
    with pytest.raises(ValueError, match="give the collator a PromptBuilder"):
        PackingCollator(64, pad_token_id=0)([reports[0]])
    with pytest.raises(ValueError, match="overflow must be one of"):
        PackingCollator(64, pad_token_id=0, overflow="drop")


# ------------------------------------------------------------------------------------------------ M-RoPE

def test_mrope_positions_match_transformers_get_rope_index(tok, reports):
    from tests.models.tiny_hf import VISION, qwen2_vl  # the oracle: transformers' own Qwen2-VL
    merge = VISION["spatial_merge_size"]
    model = qwen2_vl().model
    grids = [(1, 2, 3), (1, 3, 2)]
    builder = PromptBuilder(tok, "qwen2_vl", image_tokens=grids)
    samples = [builder(s) for s in reports[:3]]
    budget = max(len(s) for s in samples) + 7
    batch = PackingCollator(budget, rows=3, builder=builder)(reports[:3])
    assert batch.position_ids.shape == (3, 3, budget)
    pad = tok.token_to_id("<|image_pad|>")
    for index, sample in enumerate(samples):
        ids = torch.tensor([sample.input_ids])
        theirs, _ = model.get_rope_index(ids, mm_token_type_ids=(ids == pad).int(),
                                         image_grid_thw=torch.tensor([[t, h * merge, w * merge] for t, h, w in grids]))
        assert torch.equal(sequence_positions(len(sample), sample.spans, mrope=True), theirs[:, 0])
        where = (batch.sample_index.reshape(-1) == batch.sample_ids.index(sample.sample_id)).nonzero().squeeze(-1)
        assert torch.equal(batch.position_ids.reshape(3, -1)[:, where], theirs[:, 0])


# --------------------------------------------------------------------------------- decoder on the batches

@pytest.mark.parametrize("mrope", [False, True], ids=["rope", "mrope"])
def test_trimmed_batch_drops_the_padding_tail_and_keeps_every_token(tok, reports, mrope):
    builder = builder_for(tok, mrope)
    decoder = tiny_decoder(tok.vocab_size, mrope)
    samples = [builder(s) for s in reports[:5]]
    budget = 3 * max(len(s) for s in samples) + 11  # rows end well short of the budget
    batch = PackingCollator(budget, rows=3, builder=builder)(samples)
    cut = batch.trimmed()
    real = batch.sample_index >= 0
    width = max(int(row.nonzero()[-1]) + 1 for row in real if row.any())
    assert width < budget and cut.input_ids.shape == cut.labels.shape == cut.sample_index.shape == (3, width)
    assert cut.position_ids.shape[-1] == width and cut.num_tokens == batch.num_tokens
    bounds = cut.cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == 3 * width and bounds == sorted(set(bounds))
    assert all(r * width in bounds for r in range(3))  # still no document across a row
    # The image placeholders moved with their tokens.
    assert torch.equal(cut.sample_index.reshape(-1)[cut.span_index("image")],
                       batch.sample_index.reshape(-1)[batch.span_index("image")])
    # Every real token sees the same context: same hidden states, same per-token loss.
    full = decoder(input_ids=batch.input_ids, **batch.decoder_inputs())[:, :width][real[:, :width]]
    trimmed = decoder(input_ids=cut.input_ids, **cut.decoder_inputs())[cut.sample_index >= 0]
    torch.testing.assert_close(trimmed, full, **FP32)
    assert torch.equal(cut.labels[cut.sample_index >= 0], batch.labels[real])
    assert cut.trimmed() is cut  # nothing left to cut


@pytest.mark.parametrize("mrope", [False, True], ids=["rope", "mrope"])
def test_packed_sft_loss_equals_unpacked_samples(tok, reports, mrope):
    builder = builder_for(tok, mrope)
    decoder = tiny_decoder(tok.vocab_size, mrope)
    samples = [builder(s) for s in reports[:5]]
    budget = 2 * max(len(s) for s in samples) + 9  # several samples per row, and padding
    batch = PackingCollator(budget, rows=3, builder=builder)(samples)
    weights = torch.randn(len(samples), generator=torch.Generator().manual_seed(1))

    hidden = decoder(input_ids=batch.input_ids, **batch.decoder_inputs())
    token_loss = linear_cross_entropy(hidden, decoder.lm_head.weight, batch.labels, reduction="none").reshape(-1)
    owner = batch.sample_index.reshape(-1)
    packed = torch.zeros(len(samples)).index_add(0, owner[owner >= 0], token_loss[owner >= 0])
    order = [[s.sample_id for s in samples].index(i) for i in batch.sample_ids]
    (packed * weights[order]).sum().backward()
    packed_grads = grads(decoder)

    unpacked = torch.stack([-answer_logp(alone(decoder, s, mrope), s) for s in samples])
    (unpacked * weights).sum().backward()
    torch.testing.assert_close(packed, unpacked[order], **FP32)
    for name, grad in grads(decoder).items():
        torch.testing.assert_close(packed_grads[name], grad, **FP32, msg=name)


def test_packed_sft_in_bf16_is_as_close_to_fp32_as_unpacked_bf16(tok, reports):
    builder = builder_for(tok, mrope=False)
    decoder = tiny_decoder(tok.vocab_size, False)
    samples = [builder(s) for s in reports[:4]]
    batch = PackingCollator(2 * max(len(s) for s in samples) + 3, rows=2, builder=builder)(samples)
    order = [[s.sample_id for s in samples].index(i) for i in batch.sample_ids]
    owner = batch.sample_index.reshape(-1)
    results = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            decoder.to(dtype)
            hidden = decoder(input_ids=batch.input_ids, **batch.decoder_inputs())
            token_loss = linear_cross_entropy(hidden, decoder.lm_head.weight, batch.labels, reduction="none")
            packed = torch.zeros(len(samples)).index_add(0, owner[owner >= 0], token_loss.reshape(-1)[owner >= 0])
            unpacked = torch.stack([-answer_logp(alone(decoder, s, False), s) for s in samples])[order]
            results[dtype] = (packed, unpacked)
    exact = results[torch.float32][1]
    packed_bf16, unpacked_bf16 = results[torch.bfloat16]
    torch.testing.assert_close(packed_bf16, exact, rtol=2e-2, atol=0.5)
    assert (packed_bf16 - exact).abs().max() <= 2 * (unpacked_bf16 - exact).abs().max() + 0.05


@pytest.mark.parametrize("mrope", [False, True], ids=["rope", "mrope"])
def test_shared_prompt_dpo_equals_separate_sequences(tok, pairs_samples, mrope):
    builder = builder_for(tok, mrope)
    decoder = tiny_decoder(tok.vocab_size, mrope)
    pairs = [builder.pair(s) for s in pairs_samples[:4]]
    budget = 2 * max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) + 5
    shared = DPOCollator(budget, rows=3, builder=builder)(pairs)
    padded = DPOCollator(max(len(p.full(w)) for p in pairs for w in ("chosen", "rejected")), layout="padded",
                         builder=builder)(pairs)
    assert shared.layout is not None and padded.layout is None
    assert shared.num_tokens == sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert padded.num_tokens == shared.num_tokens + sum(len(p.prompt_ids) for p in pairs)
    # The image is spliced once per pair in the shared layout, twice (as TRL runs it) in the padded one.
    image_tokens = len(pairs) * pairs[0].spans[0].length
    assert shared.span_index("image").numel() == image_tokens and padded.span_index("image").numel() == 2 * image_tokens
    a, b = torch.randn(2, len(pairs), generator=torch.Generator().manual_seed(2))

    results = {}
    for name, batch in (("shared", shared), ("padded", padded)):
        hidden = decoder(input_ids=batch.input_ids, **batch.decoder_inputs())
        chosen, rejected = dpo_sequence_logps(hidden, *batch.dpo_targets(hidden), decoder.lm_head.weight)
        order = [[p.sample_id for p in pairs].index(i) for i in batch.sample_ids[:len(pairs)]]
        back = torch.tensor(order).argsort()  # batch order -> pair order
        chosen, rejected = chosen[back], rejected[back]
        (a * chosen + b * rejected).sum().backward()
        results[name] = (chosen.detach(), rejected.detach(), grads(decoder))

    separate_c = torch.stack([answer_logp(alone(decoder, p.full("chosen"), mrope), p.full("chosen")) for p in pairs])
    separate_r = torch.stack([answer_logp(alone(decoder, p.full("rejected"), mrope), p.full("rejected"))
                              for p in pairs])
    (a * separate_c + b * separate_r).sum().backward()
    separate_grads = grads(decoder)
    for name, (chosen, rejected, layout_grads) in results.items():
        torch.testing.assert_close(chosen, separate_c.detach(), **FP32, msg=f"{name} chosen")
        torch.testing.assert_close(rejected, separate_r.detach(), **FP32, msg=f"{name} rejected")
        for param, grad in separate_grads.items():
            torch.testing.assert_close(layout_grads[param], grad, **FP32, msg=f"{name} {param}")


def test_both_dpo_layouts_feed_fused_dpo_loss_alike(tok, pairs_samples):
    builder = builder_for(tok, mrope=False)
    policy, reference = tiny_decoder(tok.vocab_size, False, seed=0), tiny_decoder(tok.vocab_size, False, seed=1)
    pairs = [builder.pair(s) for s in pairs_samples[:3]]
    longest = max(len(p.full(w)) for p in pairs for w in ("chosen", "rejected"))
    losses = []
    # One pair per row keeps the pair order the same in both layouts, so the metrics line up too.
    for batch in (DPOCollator(2 * longest, rows=3, builder=builder)(pairs),
                  DPOCollator(longest, layout="padded", builder=builder)(pairs)):
        with torch.no_grad():
            ref_hidden = reference(input_ids=batch.input_ids, **batch.decoder_inputs())
        hidden = policy(input_ids=batch.input_ids, **batch.decoder_inputs())
        inputs = dpo_loss_inputs(hidden, *batch.dpo_targets(hidden), ref_hidden=ref_hidden)
        loss, metrics = fused_dpo_loss(**inputs, weight=policy.lm_head.weight,
                                       ref_weight=reference.lm_head.weight, beta=0.1)
        losses.append((loss, metrics, sorted(batch.sample_ids[:3])))
    (shared, shared_metrics, ids_a), (padded, padded_metrics, ids_b) = losses
    # The shared layout's rejected answers attend to [prompt, rejected]: more keys than queries.
    shared_batch = DPOCollator(2 * longest, rows=3, builder=builder)(pairs)
    documents = shared_batch.attention_documents()
    assert len(documents) == 2 * len(pairs) and sum(q for q, _ in documents) == shared_batch.num_tokens
    rejected = sorted((len(p.rejected_ids), len(p.prompt_ids) + len(p.rejected_ids)) for p in pairs)
    assert sorted(d for d in documents if d[0] < d[1]) == rejected
    assert ids_a == ids_b
    torch.testing.assert_close(shared, padded, **FP32)
    assert shared.item() != pytest.approx(np.log(2), abs=1e-4)  # the two models really differ


def test_layout_checks_and_default_positions(tok, pairs_samples):
    builder = builder_for(tok, mrope=False)
    pair = builder.pair(pairs_samples[0])
    n = len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
    batch = DPOCollator(n, builder=builder)([pair])
    decoder = tiny_decoder(tok.vocab_size, False)
    with torch.no_grad():
        explicit = decoder(input_ids=batch.input_ids, **batch.decoder_inputs())
        # Without position ids each document counts from its keys before its queries: rejected follows the prompt.
        default = decoder(input_ids=batch.input_ids, layout=batch.layout)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.layout.seg_k.bounds == batch.layout.seg_k.bounds
    with pytest.raises(ValueError, match="layout must be an AttentionLayout, got dict"):
        decoder(input_ids=batch.input_ids, layout={"seg_q": None})
    with pytest.raises(ValueError, match="pass layout alone, without cu_seqlens or cache"):
        decoder(input_ids=batch.input_ids, layout=batch.layout, cu_seqlens=batch.cu_seqlens)
    with pytest.raises(ValueError, match=f"seg_q covers {n} tokens, the stream has {n - 1}"):
        decoder(input_ids=batch.input_ids[:, 1:], layout=batch.layout)
    with pytest.raises(ValueError, match=r"kv_index entries must lie in \[0, 3\)"):
        AttentionLayout.from_lengths([3], [3], [0, 1, 3], "cpu")
    with pytest.raises(ValueError, match="a document has more queries than keys"):
        AttentionLayout.from_lengths([3], [2], [0, 1], "cpu")
    with pytest.raises(ValueError, match="takes .* tokens, more than the budget"):
        DPOCollator(n - 1, builder=builder)([pair])
    with pytest.raises(ValueError, match="2 pairs need 2 rows"):
        DPOCollator(n, builder=builder)([pair, pair])
    with pytest.raises(ValueError, match="prompt \\+ rejected takes"):
        DPOCollator(len(pair.full("chosen")), layout="padded", builder=builder)(
            [dataclasses.replace(pair, rejected_ids=pair.rejected_ids + pair.chosen_ids)])
    with pytest.raises(ValueError, match="needs a batch from DPOCollator"):
        PackingCollator(64, builder=builder)([pairs_samples[0]]).dpo_targets(torch.zeros(1, 64, 32))
    with pytest.raises(ValueError, match=r"hidden must be \[1, \d+, D\] like the batch's input_ids"):
        batch.dpo_targets(torch.zeros(1, n + 1, 32))
    with pytest.raises(ValueError, match="layout must be one of"):
        DPOCollator(64, layout="interleaved", builder=builder)

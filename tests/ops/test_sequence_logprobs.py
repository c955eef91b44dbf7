"""sequence_logprobs / sequence_token_counts against a Python loop over the packed sequences."""

import pytest
import torch

from mrgfast.ops import sequence_logprobs, sequence_token_counts
from mrgfast.ops.sequence_logprobs import reference_sequence_logprobs

# Sequence lengths of one packing: empty sequences first, in the middle, last, alone, and no sequence at all.
LENGTHS = [
    [3, 0, 5, 1, 0, 7],
    [0, 4],
    [4, 0],
    [1],
    [0],
    [],
    [13, 2, 9, 9, 1, 6, 4],
]


def packing(lengths, index_dtype=torch.int64, seed=0, dtype=torch.float32):
    """(token_logps [N], cu_seqlens [S+1], mask [N]) for sequences of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=index_dtype)
    logps = (-torch.rand(n, generator=gen, dtype=torch.float64) * 5).to(dtype)
    mask = torch.rand(n, generator=gen) > 0.4
    return logps, cu, mask


def loop_logprobs(logps, lengths, average=False, mask=None):
    """Per-sequence sums or means, one Python slice per sequence (the independent oracle)."""
    out, start = [], 0
    for length in lengths:
        span = logps[start:start + length]
        keep = torch.ones(length, dtype=torch.bool) if mask is None else mask[start:start + length]
        total = (span * keep.to(span.dtype)).sum()
        count = int(keep.sum())
        out.append(total / count if average and count else total)
        start += length
    return torch.stack(out) if out else logps.new_zeros(0)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_sums_match_loop(lengths, index_dtype):
    logps, cu, _ = packing(lengths, index_dtype)
    got = sequence_logprobs(logps, cu)
    assert got.shape == (len(lengths),)
    torch.testing.assert_close(got, loop_logprobs(logps, lengths), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_masked_sums_and_means_match_loop(lengths, average):
    logps, cu, mask = packing(lengths, seed=1)
    got = sequence_logprobs(logps, cu, average=average, token_mask=mask)
    torch.testing.assert_close(got, loop_logprobs(logps, lengths, average, mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lengths", LENGTHS)
def test_unmasked_means_match_loop(lengths):
    logps, cu, _ = packing(lengths, seed=2)
    got = sequence_logprobs(logps, cu, average=True)
    torch.testing.assert_close(got, loop_logprobs(logps, lengths, average=True), rtol=1e-6, atol=1e-6)


def test_module_reference_matches_loop():
    lengths = LENGTHS[0]
    logps, cu, mask = packing(lengths, seed=3)
    for average in (False, True):
        torch.testing.assert_close(reference_sequence_logprobs(logps, cu, average, mask),
                                   loop_logprobs(logps, lengths, average, mask))


def test_all_masked_and_empty_sequences_give_zero_not_nan():
    lengths = [3, 0, 4, 2]
    logps, cu, _ = packing(lengths, seed=4)
    logps.requires_grad_(True)
    mask = torch.tensor([True, False, True] + [False] * 4 + [True, True])  # sequence 2 has no counted token
    means = sequence_logprobs(logps, cu, average=True, token_mask=mask)
    assert torch.isfinite(means).all()
    assert means[1] == 0 and means[2] == 0
    means.sum().backward()
    assert torch.isfinite(logps.grad).all()
    assert (logps.grad[3:7] == 0).all()


def test_nonfinite_values_at_masked_positions_do_not_leak():
    logps, cu, mask = packing([5, 6], seed=5)
    logps = torch.where(mask, logps, torch.full_like(logps, float("-inf")))
    got = sequence_logprobs(logps, cu, average=True, token_mask=mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, loop_logprobs(torch.where(mask, logps, 0.0), [5, 6], True, mask))


@pytest.mark.parametrize("average", [False, True])
def test_gradients_match_loop(average):
    lengths = LENGTHS[-1] + [0, 3]
    logps, cu, mask = packing(lengths, seed=6)
    upstream = torch.randn(len(lengths), generator=torch.Generator().manual_seed(7))
    ours = logps.clone().requires_grad_(True)
    ref = logps.clone().requires_grad_(True)
    (sequence_logprobs(ours, cu, average, mask) * upstream).sum().backward()
    (loop_logprobs(ref, lengths, average, mask) * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-6, atol=1e-7)


def test_gradcheck_fp64():
    logps, cu, mask = packing([3, 0, 4, 2], seed=8, dtype=torch.float64)
    logps.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sequence_logprobs(x, cu, average=True, token_mask=mask), (logps,))


def test_batch_of_one_input_and_mask():
    logps, cu, mask = packing([4, 3, 5], seed=9)
    got = sequence_logprobs(logps[None], cu, average=True, token_mask=mask[None])
    torch.testing.assert_close(got, loop_logprobs(logps, [4, 3, 5], True, mask))


def test_low_precision_input_accumulates_in_fp32():
    logps, cu, _ = packing([200, 300], seed=10)
    got = sequence_logprobs(logps.bfloat16(), cu)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loop_logprobs(logps.bfloat16().float(), [200, 300]), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("lengths", LENGTHS)
def test_token_counts(lengths):
    _, cu, mask = packing(lengths, seed=11)
    plain = sequence_token_counts(cu)
    masked = sequence_token_counts(cu, mask)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert plain.tolist() == list(lengths)
    assert masked.tolist() == [int(mask[s:s + n].sum()) for s, n in zip(starts, lengths)]
    assert plain.dtype == masked.dtype == torch.int64


def test_return_counts():
    lengths = [3, 0, 5, 1]
    logps, cu, mask = packing(lengths, seed=12)
    values, counts = sequence_logprobs(logps, cu, token_mask=mask, return_counts=True)
    torch.testing.assert_close(values, loop_logprobs(logps, lengths, mask=mask))
    assert counts.tolist() == sequence_token_counts(cu, mask).tolist()
    _, plain_counts = sequence_logprobs(logps, cu, return_counts=True)
    assert plain_counts.tolist() == lengths


def test_runs_on_meta_tensors_so_it_never_reads_values():
    # Meta tensors have shapes but no data: any .item(), .tolist() or data-dependent shape raises, which
    # proves the op never synchronises with the device and can be captured in a CUDA graph.
    logps = torch.empty(11, device="meta", requires_grad=True)
    cu = torch.empty(5, dtype=torch.int32, device="meta")
    mask = torch.empty(11, dtype=torch.bool, device="meta")
    out, counts = sequence_logprobs(logps, cu, average=True, token_mask=mask, return_counts=True)
    assert out.shape == (4,) and counts.shape == (4,)
    out.sum().backward()
    assert logps.grad.shape == (11,)
    assert sequence_token_counts(cu, mask).shape == (4,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(token_logps=torch.zeros(6), cu_seqlens=torch.tensor([[0, 6]])), "cu_seqlens"),
    (dict(token_logps=torch.zeros(6), cu_seqlens=torch.zeros(0, dtype=torch.int64)), "cu_seqlens"),
    (dict(token_logps=torch.zeros(6), cu_seqlens=torch.tensor([0.0, 6.0])), "cu_seqlens"),
    (dict(token_logps=torch.zeros(2, 3), cu_seqlens=torch.tensor([0, 6])), "token_logps"),
    (dict(token_logps=torch.zeros(6, dtype=torch.int64), cu_seqlens=torch.tensor([0, 6])), "token_logps"),
    (dict(token_logps=torch.zeros(6), cu_seqlens=torch.tensor([0, 6]), token_mask=torch.ones(5, dtype=torch.bool)),
     "token_mask"),
    (dict(token_logps=torch.zeros(6), cu_seqlens=torch.tensor([0, 6]), token_mask=torch.ones(6)), "token_mask"),
])
def test_bad_shapes_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sequence_logprobs(**kwargs)


@pytest.mark.parametrize("cu, match", [
    ([0, 3, 5], "end at the number of tokens"),
    ([0, 3, 7], "end at the number of tokens"),
    ([1, 3, 6], "start at 0"),
    ([0, 4, 2, 6], "non-decreasing"),
])
def test_validate_checks_boundary_values(cu, match):
    cu = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        sequence_logprobs(torch.zeros(6), cu, validate=True)
    # Without validate the op reads no values; bad boundaries must still not index out of bounds.
    assert sequence_logprobs(torch.zeros(6), cu).shape == (cu.shape[0] - 1,)


def test_validate_accepts_good_boundaries():
    logps, cu, mask = packing([3, 0, 3], seed=13)
    torch.testing.assert_close(sequence_logprobs(logps, cu, token_mask=mask, validate=True),
                               loop_logprobs(logps, [3, 0, 3], mask=mask))
    assert sequence_token_counts(cu, mask, validate=True).tolist() == sequence_token_counts(cu, mask).tolist()


def test_tokens_past_the_last_boundary_are_dropped_without_validate():
    logps = torch.arange(1.0, 8.0)
    got = sequence_logprobs(logps, torch.tensor([0, 2, 5]))
    assert got.tolist() == [3.0, 12.0]

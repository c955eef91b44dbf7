"""dpo_loss_inputs / dpo_sequence_logps on plain tensors against a hand-written gather and log-softmax."""

import pytest
import torch

from mrgfast.losses import dpo_loss_inputs, dpo_sequence_logps


def packed(seed: int = 0):
    """hidden [2, 5, 4], the flat rows scoring 2 chosen then 2 rejected answers, their tokens and bounds."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 5, 4, generator=gen)
    index = torch.tensor([1, 2, 6, 3, 4, 7, 8, 9])
    labels = torch.randint(0, 7, (8,), generator=gen)
    cu_seqlens = torch.tensor([0, 2, 3, 5, 8], dtype=torch.int32)
    return hidden, index, labels, cu_seqlens


def test_dpo_loss_inputs_gathers_the_scored_rows_of_hidden_and_ref_hidden():
    hidden, index, labels, cu_seqlens = packed()
    ref = hidden * 2
    out = dpo_loss_inputs(hidden, index, labels, cu_seqlens, ref_hidden=ref)
    flat = hidden.reshape(10, 4)
    torch.testing.assert_close(out["hidden"], torch.stack([flat[i] for i in index.tolist()]), rtol=0, atol=0)
    torch.testing.assert_close(out["ref_hidden"], 2 * out["hidden"], rtol=0, atol=0)
    assert out["labels"] is labels and out["cu_seqlens"] is cu_seqlens
    assert "ref_hidden" not in dpo_loss_inputs(hidden, index, labels, cu_seqlens)
    with pytest.raises(ValueError, match=r"ref_hidden must have hidden's shape \(2, 5, 4\), got \(2, 4, 4\)"):
        dpo_loss_inputs(hidden, index, labels, cu_seqlens, ref_hidden=ref[:, :4])


def test_dpo_sequence_logps_sums_each_answer_of_the_chosen_then_rejected_halves():
    hidden, index, labels, cu_seqlens = packed(1)
    weight = torch.randn(7, 4, generator=torch.Generator().manual_seed(3))
    chosen, rejected = dpo_sequence_logps(hidden, index, labels, cu_seqlens, weight)
    rows = hidden.reshape(10, 4)[index]
    token = torch.log_softmax(rows @ weight.T, -1).gather(1, labels[:, None])[:, 0]
    bounds = cu_seqlens.tolist()
    sums = torch.stack([token[a:b].sum() for a, b in zip(bounds, bounds[1:])])
    torch.testing.assert_close(chosen, sums[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected, sums[2:], rtol=1e-5, atol=1e-5)

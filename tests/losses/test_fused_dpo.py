"""fused_dpo_loss against the naive path: full logits -> log_softmax -> gather -> mask -> sum -> dpo_loss."""

import pytest
import torch

from mrgfast.losses import dpo_loss, fused_dpo_loss
from mrgfast.ops.backends.torch import linear_cross_entropy as torch_head

VOCAB, DIM = 1001, 24  # a vocabulary that is not a multiple of any block or chunk size
# 2P = 6 packed sequences: P chosen then P rejected; (length, prompt tokens) each. The last one is all prompt.
SEQUENCES = [(9, 3), (5, 2), (12, 4), (7, 3), (10, 2), (4, 4)]
LOSS_CASES = [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.15)]
REF_MODES = ["logps_tensor", "logps_tuple", "hidden", "hidden_own_head"]


def packed_batch(sequences=SEQUENCES, seed=0, with_bias=True):
    """Hidden states, head, shifted labels (prompt = -100), cu_seqlens and reference tensors of one packing."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(length for length, _ in sequences)
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    start = 0
    for length, prompt in sequences:
        labels[start:start + prompt] = -100
        start += length
    cu = torch.tensor([0] + torch.tensor([length for length, _ in sequences]).cumsum(0).tolist(), dtype=torch.int32)
    return dict(
        hidden=torch.randn(n, DIM, generator=gen),
        weight=torch.randn(VOCAB, DIM, generator=gen) * 0.3,
        bias=torch.randn(VOCAB, generator=gen) * 0.5 if with_bias else None,
        labels=labels, cu_seqlens=cu,
        ref_hidden=torch.randn(n, DIM, generator=gen),
        ref_weight=torch.randn(VOCAB, DIM, generator=gen) * 0.3,
        ref_bias=torch.randn(VOCAB, generator=gen) * 0.5 if with_bias else None,
        ref_logps=-torch.rand(len(sequences), generator=gen) * 40,
    )


def naive_sequence_logps(hidden, weight, bias, labels, cu_seqlens):
    """(per-sequence summed log-probs, counted tokens) through the full [N, V] logits and a Python loop."""
    logits = hidden @ weight.T + (0 if bias is None else bias)
    logp = logits.log_softmax(-1)
    valid = labels != -100
    token = logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * valid
    bounds = cu_seqlens.tolist()
    sums = torch.stack([token[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    counts = torch.tensor([int(valid[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])])
    return sums, counts


def naive_dpo(batch, ref_mode, hidden, weight, bias, **kwargs):
    """The DPO loss the unfused way, with the reference taken as fused_dpo_loss takes it in `ref_mode`."""
    sums, counts = naive_sequence_logps(hidden, weight, bias, batch["labels"], batch["cu_seqlens"])
    if ref_mode.startswith("logps"):
        ref = batch["ref_logps"]
    else:
        own = ref_mode == "hidden_own_head"
        with torch.no_grad():
            ref, _ = naive_sequence_logps(batch["ref_hidden"], batch["ref_weight"] if own else weight,
                                          batch["ref_bias"] if own else bias, batch["labels"], batch["cu_seqlens"])
    p = sums.shape[0] // 2
    return dpo_loss(sums[:p], sums[p:], ref[:p], ref[p:], chosen_lengths=counts[:p], rejected_lengths=counts[p:],
                    **kwargs)


def reference_kwargs(batch, ref_mode):
    """The ref_* arguments of fused_dpo_loss for a reference mode."""
    p = batch["ref_logps"].shape[0] // 2
    if ref_mode == "logps_tensor":
        return dict(ref_logps=batch["ref_logps"])
    if ref_mode == "logps_tuple":
        return dict(ref_logps=(batch["ref_logps"][:p], batch["ref_logps"][p:]))
    if ref_mode == "hidden":
        return dict(ref_hidden=batch["ref_hidden"])
    return dict(ref_hidden=batch["ref_hidden"], ref_weight=batch["ref_weight"], ref_bias=batch["ref_bias"])


def run_both(batch, ref_mode, train_head, **kwargs):
    """(fused loss, metrics, grads), (naive loss, metrics, grads) on fresh leaves of the same values."""
    results = []
    for fused in (True, False):
        hidden = batch["hidden"].clone().requires_grad_(True)
        weight = batch["weight"].clone().requires_grad_(train_head)
        bias = None if batch["bias"] is None else batch["bias"].clone().requires_grad_(train_head)
        if fused:
            loss, metrics = fused_dpo_loss(hidden, weight, batch["labels"], batch["cu_seqlens"], bias=bias,
                                           **reference_kwargs(batch, ref_mode), **kwargs)
        else:
            loss, metrics = naive_dpo(batch, ref_mode, hidden, weight, bias, **kwargs)
        loss.backward()
        leaves = [hidden] + ([weight] + ([] if bias is None else [bias]) if train_head else [])
        results.append((loss, metrics, [leaf.grad for leaf in leaves]))
    return results


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("ref_mode", REF_MODES)
@pytest.mark.parametrize("loss_type, smoothing", LOSS_CASES)
def test_matches_naive_path(loss_type, smoothing, ref_mode, train_head):
    batch = packed_batch(seed=1)
    (loss, metrics, grads), (want, want_metrics, want_grads) = run_both(
        batch, ref_mode, train_head, beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert set(metrics) == set(want_metrics)
    for name in metrics:
        torch.testing.assert_close(metrics[name], want_metrics[name], rtol=1e-5, atol=1e-5, msg=name)
    assert len(grads) == (3 if train_head else 1)
    for got, expected in zip(grads, want_grads):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_rpo_matches_naive_path_and_adds_the_chosen_token_nll():
    # loss_type=[sigmoid, sft] (RPO): the fused path must count the chosen tokens as the naive one does.
    batch = packed_batch(seed=6)
    rpo = dict(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.4])
    (loss, _, grads), (want, _, want_grads) = run_both(batch, "hidden", True, **rpo)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    (plain, _, _), _ = run_both(batch, "hidden", True, beta=0.1)
    sums, counts = naive_sequence_logps(batch["hidden"], batch["weight"], batch["bias"], batch["labels"],
                                        batch["cu_seqlens"])
    p = sums.shape[0] // 2
    torch.testing.assert_close(loss, plain - 0.4 * sums[:p].sum() / counts[:p].sum(), rtol=1e-5, atol=1e-6)


def test_matches_naive_path_without_bias_across_chunks(monkeypatch):
    # A chunk budget of a few tokens makes chunk boundaries fall inside and between the packed sequences.
    monkeypatch.setattr(torch_head, "CHUNK_BUDGET_BYTES", 5 * VOCAB * 4)
    batch = packed_batch(seed=2, with_bias=False)
    (loss, _, grads), (want, _, want_grads) = run_both(batch, "hidden", True, beta=0.1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_ipo_uses_token_averages():
    batch = packed_batch(seed=3)
    loss, _ = fused_dpo_loss(batch["hidden"], batch["weight"], batch["labels"], batch["cu_seqlens"],
                             bias=batch["bias"], ref_logps=batch["ref_logps"], loss_type="ipo", beta=0.1)
    sums, counts = naive_sequence_logps(batch["hidden"], batch["weight"], batch["bias"], batch["labels"],
                                        batch["cu_seqlens"])
    ratios = (sums - batch["ref_logps"]) / counts.clamp(min=1)
    expected = ((ratios[:3] - ratios[3:] - 1 / (2 * 0.1)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_batch_of_one_layout():
    batch = packed_batch(seed=4)
    args = (batch["hidden"], batch["weight"], batch["labels"], batch["cu_seqlens"])
    flat, _ = fused_dpo_loss(*args, bias=batch["bias"], ref_logps=batch["ref_logps"])
    batched, _ = fused_dpo_loss(args[0][None], args[1], args[2][None], args[3], bias=batch["bias"],
                                ref_logps=batch["ref_logps"])
    torch.testing.assert_close(batched, flat)


def test_reference_gets_no_gradient():
    batch = packed_batch(seed=5)
    hidden = batch["hidden"].clone().requires_grad_(True)
    ref_hidden = batch["ref_hidden"].clone().requires_grad_(True)
    ref_weight = batch["ref_weight"].clone().requires_grad_(True)
    ref_logps = batch["ref_logps"].clone().requires_grad_(True)
    loss, _ = fused_dpo_loss(hidden, batch["weight"], batch["labels"], batch["cu_seqlens"], ref_hidden=ref_hidden,
                             ref_weight=ref_weight)
    loss.backward()
    assert hidden.grad is not None and ref_hidden.grad is None and ref_weight.grad is None
    loss, _ = fused_dpo_loss(hidden, batch["weight"], batch["labels"], batch["cu_seqlens"], ref_logps=ref_logps)
    loss.backward()
    assert ref_logps.grad is None


@pytest.mark.parametrize("sequences", [SEQUENCES[:5], SEQUENCES[:1], []])
def test_odd_sequence_count_raises(sequences):
    batch = packed_batch(sequences, seed=6)
    with pytest.raises(ValueError, match="chosen/rejected count mismatch"):
        fused_dpo_loss(batch["hidden"], batch["weight"], batch["labels"], batch["cu_seqlens"],
                       ref_logps=torch.zeros(len(sequences)))


@pytest.mark.parametrize("ref_kwargs, match", [
    (dict(), "exactly one of ref_logps"),
    (dict(ref_logps=torch.zeros(6), ref_hidden=torch.zeros(47, DIM)), "exactly one of ref_logps"),
    (dict(ref_logps=torch.zeros(5)), "ref_logps"),
    (dict(ref_logps=(torch.zeros(3), torch.zeros(2))), "chosen/rejected count mismatch"),
    (dict(ref_logps=[torch.zeros(3)]), "ref_logps"),
    (dict(ref_hidden=torch.zeros(46, DIM)), "ref_hidden"),
    (dict(ref_logps=torch.zeros(6), ref_weight=torch.zeros(VOCAB, DIM)), "ref_weight"),
])
def test_bad_reference_arguments_raise(ref_kwargs, match):
    batch = packed_batch(seed=7)
    assert batch["hidden"].shape[0] == 47
    with pytest.raises(ValueError, match=match):
        fused_dpo_loss(batch["hidden"], batch["weight"], batch["labels"], batch["cu_seqlens"], **ref_kwargs)


def test_bad_loss_type_raises_before_any_work():
    batch = packed_batch(seed=8)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        fused_dpo_loss(batch["hidden"], batch["weight"], batch["labels"], batch["cu_seqlens"],
                       ref_logps=batch["ref_logps"], loss_type="kto")


def test_validate_checks_labels_and_boundaries():
    batch = packed_batch(seed=9)
    labels = batch["labels"].clone()
    labels[-1] = VOCAB
    with pytest.raises(ValueError, match="labels"):
        fused_dpo_loss(batch["hidden"], batch["weight"], labels, batch["cu_seqlens"], ref_logps=batch["ref_logps"],
                       validate=True)
    cu = batch["cu_seqlens"].clone()
    cu[-1] -= 1
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_dpo_loss(batch["hidden"], batch["weight"], batch["labels"], cu, ref_logps=batch["ref_logps"],
                       validate=True)


@pytest.mark.gpu
def test_fused_dpo_on_gpu_runs_and_is_finite():
    hidden = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(1001, 128, device="cuda", dtype=torch.bfloat16) / 11
    labels = torch.randint(0, 1001, (64,), device="cuda")
    cu_seqlens = torch.tensor([0, 16, 32, 48, 64], device="cuda", dtype=torch.int32)
    loss, metrics = fused_dpo_loss(hidden, weight, labels, cu_seqlens, ref_logps=torch.zeros(4, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()
    assert set(metrics) >= {"rewards/chosen", "rewards/margins", "logps/rejected"}

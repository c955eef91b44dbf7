"""The Liger-Kernel peer cases, run on the CPU against a stand-in `liger_kernel` with Liger's call signatures; and the
harness pieces they and the suite rely on (--set overrides, headlines without peers)."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness, peers

SHAPES = dict(warmup=0, repeats=1)


def sequence_logps(weight, hidden, target):
    """Summed log p(label) per sequence of [B, T, D] hidden states (ignored labels -100)."""
    logp = F.linear(hidden.float(), weight.float()).log_softmax(-1)
    valid = target != -100
    picked = logp.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(-1), valid.sum(-1)


class FakeCrossEntropy(torch.nn.Module):
    """Liger's LigerFusedLinearCrossEntropyLoss call: (head weight, hidden, target) -> mean cross-entropy."""

    def __init__(self, ignore_index=-100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, lin_weight, _input, target, bias=None):
        return F.cross_entropy(F.linear(_input.float(), lin_weight.float()), target, ignore_index=self.ignore_index)


class FakeDPO(torch.nn.Module):
    """Liger's LigerFusedLinearDPOLoss call: chosen then rejected rows of [2P, T, D] -> (loss, extras)."""

    def __init__(self, ignore_index=-100, beta=0.1, compute_nll_loss=False, compiled=True, use_ref_model=True,
                 average_log_prob=True):
        super().__init__()
        self.beta, self.average = beta, average_log_prob

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        def logps(weight, hidden):
            total, count = sequence_logps(weight, hidden, target)
            return total / count if self.average else total
        policy = logps(lin_weight, _input)
        with torch.no_grad():
            ref = logps(ref_weight, ref_input)
        pairs = target.shape[0] // 2
        margin = (policy[:pairs] - ref[:pairs]) - (policy[pairs:] - ref[pairs:])
        return -F.logsigmoid(self.beta * margin).mean(), ()


@pytest.fixture
def fake_liger(monkeypatch):
    """A stand-in liger_kernel package with the two loss modules."""
    package = types.ModuleType("liger_kernel")
    transformers = types.ModuleType("liger_kernel.transformers")
    chunked = types.ModuleType("liger_kernel.chunked_loss")
    transformers.LigerFusedLinearCrossEntropyLoss = FakeCrossEntropy
    chunked.LigerFusedLinearDPOLoss = FakeDPO
    for name, module in (("liger_kernel", package), ("liger_kernel.transformers", transformers),
                         ("liger_kernel.chunked_loss", chunked)):
        monkeypatch.setitem(sys.modules, name, module)


def head_inputs(tokens=64, hidden=16, vocab=50):
    """Hidden states requiring grad, a frozen head, labels with a masked prompt (as linear_cross_entropy.py)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_()
    weight = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[: tokens // 8] = -100
    return h, weight, labels


def test_cross_entropy_case_agrees_and_is_marked_a_peer(fake_liger):
    h, weight, labels = head_inputs()
    case = peers.cross_entropy_case(h, weight, labels, SHAPES, torch.device("cpu"), 1e-5)
    assert case["peer"] == "liger-kernel" and case["agrees"], case["agreement"]
    assert set(case["variants"]) == {"liger", "mrgfast"} and case["baseline"] == "liger"


def test_dpo_case_compares_summed_log_probs(fake_liger):
    h, weight, labels = head_inputs()
    case = peers.dpo_case(h, weight, labels, SHAPES, torch.device("cpu"), 1e-5)
    assert case["agrees"], case["agreement"]  # average_log_prob=False was passed: sums on both sides
    assert case["pairs"] == peers.PAIRS and case["sequence_length"] == 64 // (2 * peers.PAIRS)


def test_a_peer_that_disagrees_is_flagged_not_fatal(fake_liger, monkeypatch, capsys):
    class AveragingDPO(FakeDPO):
        def __init__(self, ignore_index=-100, beta=0.1, compute_nll_loss=False, compiled=True, use_ref_model=True):
            super().__init__(ignore_index, beta, compute_nll_loss, compiled, use_ref_model, average_log_prob=True)
    monkeypatch.setattr(sys.modules["liger_kernel.chunked_loss"], "LigerFusedLinearDPOLoss", AveragingDPO)
    h, weight, labels = head_inputs()
    case = peers.dpo_case(h, weight, labels, SHAPES, torch.device("cpu"), 1e-5)
    assert not case["agrees"] and "disagree" in capsys.readouterr().out
    assert case["speed_ratio"] > 0


def test_the_peer_needs_cuda_and_the_package():
    assert "CUDA" in peers.liger_missing(torch.device("cpu"))
    cases, reason = peers.liger_cases(None, None, None, SHAPES, torch.device("cpu"), 1e-5)
    assert cases == {} and "CUDA" in reason


def test_headline_leaves_out_peers_and_ablations():
    results = {"main": {"speed_ratio": 2.0, "memory_ratio": 0.5},
               "ablation": {"speed_ratio": 0.5, "memory_ratio": 0.9, "ablation": True},
               "liger": {"speed_ratio": 0.8, "memory_ratio": 1.2, "peer": "liger-kernel"}}
    assert harness.headline(results) == (2.0, 0.5)


def test_set_overrides_change_shapes_by_literal():
    shape = dict(tokens=512, dtype="fp32", cases=[(1, 2)])
    assert harness.with_overrides(shape, ["tokens=8192", "dtype=bf16", "cases=[(3, 4)]"]) == \
        dict(tokens=8192, dtype="bf16", cases=[(3, 4)])
    assert shape["tokens"] == 512  # the module's dict is left alone
    with pytest.raises(SystemExit, match="KEY one of tokens, dtype, cases"):
        harness.with_overrides(shape, ["token=1"])

"""dpo_loss against the formulas written out here and against TRL's own DPO loss code."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mrgfast.losses import LOSS_TYPES, dpo_loss

METRIC_NAMES = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"}
# (loss_type, label_smoothing) pairs covering every loss type and the smoothing each one reads.
CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.35), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0),
         ("robust", 0.2)]


def pair_logps(num_pairs=6, seed=0, dtype=torch.float64):
    """(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths)."""
    gen = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(num_pairs, generator=gen, dtype=torch.float64) * 40 + 5).to(dtype) for _ in range(4)]
    lengths = [torch.randint(1, 30, (num_pairs,), generator=gen) for _ in range(2)]
    return (*logps, *lengths)


def log_sigmoid(x):
    """log(1 / (1 + exp(-x))), written out rather than taken from torch.nn.functional."""
    return -torch.log1p(torch.exp(-x))


def formula_loss(pc, pr, rc, rr, beta, loss_type, e=0.0, lc=None, lr=None):
    """The DPO losses as the papers / TRL write them, averaged over pairs."""
    if loss_type == "ipo":
        d = (pc - rc) / lc.clamp(min=1) - (pr - rr) / lr.clamp(min=1)
        return ((d - 1 / (2 * beta)) ** 2).mean()
    z = beta * ((pc - rc) - (pr - rr))
    if loss_type == "sigmoid":
        per_pair = -(1 - e) * log_sigmoid(z) - e * log_sigmoid(-z)
    elif loss_type == "hinge":
        per_pair = torch.clamp(1 - z, min=0)
    else:
        per_pair = (-(1 - e) * log_sigmoid(z) + e * log_sigmoid(-z)) / (1 - 2 * e)
    return per_pair.mean()


@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize("loss_type, smoothing", CASES)
def test_loss_matches_formula(loss_type, smoothing, beta):
    pc, pr, rc, rr, lc, lr = pair_logps(seed=1)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=smoothing,
                       chosen_lengths=lc, rejected_lengths=lr)
    expected = formula_loss(pc, pr, rc, rr, beta, loss_type, smoothing, lc, lr)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_hinge_is_active_on_both_sides_of_the_margin():
    # Margins chosen so some pairs sit past the hinge (zero loss) and some before it.
    pc, pr = torch.tensor([30.0, 1.0, -3.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    rc, rr = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")
    torch.testing.assert_close(loss, torch.tensor((0.0 + 0.9 + 1.3) / 3, dtype=torch.float64))


@pytest.mark.parametrize("loss_type, smoothing", CASES)
def test_gradients_match_autograd_through_formula(loss_type, smoothing):
    base = pair_logps(seed=2)
    ours = [t.clone().requires_grad_(True) for t in base[:2]]
    ref = [t.clone().requires_grad_(True) for t in base[:2]]
    loss, _ = dpo_loss(*ours, *base[2:4], beta=0.3, loss_type=loss_type, label_smoothing=smoothing,
                       chosen_lengths=base[4], rejected_lengths=base[5])
    expected = formula_loss(*ref, *base[2:4], 0.3, loss_type, smoothing, base[4], base[5])
    loss.backward()
    expected.backward()
    for got, want in zip(ours, ref):
        assert got.grad.abs().sum() > 0
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


def test_sigmoid_gradient_in_closed_form():
    pc, pr, rc, rr, _, _ = pair_logps(seed=3)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta = 0.2
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    loss.backward()
    z = beta * ((pc - rc) - (pr - rr)).detach()
    expected = -beta * torch.sigmoid(-z) / pc.shape[0]
    torch.testing.assert_close(pc.grad, expected)
    torch.testing.assert_close(pr.grad, -expected)


def test_metrics_values_and_names():
    pc, pr, rc, rr, _, _ = pair_logps(seed=4)
    beta = 0.25
    _, metrics = dpo_loss(pc.requires_grad_(True), pr, rc, rr, beta=beta)
    assert set(metrics) == METRIC_NAMES
    chosen, rejected = beta * (pc.detach() - rc), beta * (pr - rr)
    expected = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                "rewards/accuracies": (chosen > rejected).double().mean(),
                "rewards/margins": (chosen - rejected).mean(), "logps/chosen": pc.detach().mean(),
                "logps/rejected": pr.mean()}
    assert 0 < float(expected["rewards/accuracies"]) < 1  # the data has pairs on both sides
    for name, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, name
        torch.testing.assert_close(value.double(), expected[name].double(), msg=name)


def test_tied_rewards_are_not_accurate():
    # TRL counts a pair as accurate only when the chosen reward is strictly higher.
    logps = torch.tensor([-3.0, -5.0])
    _, metrics = dpo_loss(logps, torch.tensor([-3.0, -6.0]), torch.zeros(2), torch.zeros(2))
    assert float(metrics["rewards/accuracies"]) == 0.5


def test_ipo_averages_logps_over_tokens():
    pc, pr, rc, rr, lc, lr = pair_logps(seed=5)
    beta = 0.1
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    # The same loss from per-token averages of policy and reference log-probs, with unit lengths.
    ones = torch.ones_like(lc)
    averaged, _ = dpo_loss(pc / lc, pr / lr, rc / lc, rr / lr, beta=beta, loss_type="ipo",
                           chosen_lengths=ones, rejected_lengths=ones)
    torch.testing.assert_close(loss, averaged)
    unnormalised = (((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2).mean()
    assert not torch.allclose(loss, unnormalised)
    # Metrics stay on the summed log-probs, as TRL logs them.
    torch.testing.assert_close(metrics["logps/chosen"], pc.mean())
    torch.testing.assert_close(metrics["rewards/chosen"], (beta * (pc - rc)).mean())


def test_ipo_clamps_empty_lengths_to_one():
    pc, pr, rc, rr, lc, lr = pair_logps(seed=6)
    lc = lc.clone()
    lc[0] = 0
    loss, _ = dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, formula_loss(pc, pr, rc, rr, 0.1, "ipo", 0.0, lc.clamp(min=1), lr))


@pytest.mark.parametrize("missing", ["chosen_lengths", "rejected_lengths"])
def test_ipo_requires_lengths(missing):
    pc, pr, rc, rr, lc, lr = pair_logps(seed=7)
    lengths = {"chosen_lengths": lc, "rejected_lengths": lr}
    lengths[missing] = None
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", **lengths)


def test_robust_without_smoothing_is_sigmoid():
    pc, pr, rc, rr, _, _ = pair_logps(seed=8)
    robust, _ = dpo_loss(pc, pr, rc, rr, loss_type="robust")
    sigmoid, _ = dpo_loss(pc, pr, rc, rr, loss_type="sigmoid")
    torch.testing.assert_close(robust, sigmoid)


def test_low_precision_inputs_compute_in_fp32():
    pc, pr, rc, rr, _, _ = pair_logps(seed=9, dtype=torch.bfloat16)
    loss, metrics = dpo_loss(pc, pr, rc, rr)
    assert loss.dtype == torch.float32 and metrics["rewards/chosen"].dtype == torch.float32


def test_runs_on_meta_tensors_so_it_never_reads_values():
    # Meta tensors carry no data: any .item() or data-dependent shape would raise (so: CUDA-graph safe).
    logps = [torch.empty(4, device="meta", requires_grad=i < 2) for i in range(4)]
    lengths = torch.empty(4, dtype=torch.int64, device="meta")
    for loss_type, smoothing in CASES:
        loss, metrics = dpo_loss(*logps, loss_type=loss_type, label_smoothing=smoothing, chosen_lengths=lengths,
                                 rejected_lengths=lengths)
        assert loss.shape == () and all(value.shape == () for value in metrics.values())


def test_unknown_loss_type_lists_the_allowed_ones():
    pc, pr, rc, rr, _, _ = pair_logps()
    with pytest.raises(ValueError) as error:
        dpo_loss(pc, pr, rc, rr, loss_type="kto")
    assert all(name in str(error.value) for name in LOSS_TYPES)


@pytest.mark.parametrize("which", [1, 2, 3])
def test_count_mismatch_raises(which):
    logps = list(pair_logps()[:4])
    logps[which] = logps[which][:-1]
    with pytest.raises(ValueError, match="chosen/rejected count mismatch"):
        dpo_loss(*logps)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="sigmoid", label_smoothing=1.5), "label_smoothing"),
    (dict(beta=0.0), "beta"),
    (dict(beta=-1.0), "beta"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    pc, pr, rc, rr, _, _ = pair_logps()
    with pytest.raises(ValueError, match=match):
        dpo_loss(pc, pr, rc, rr, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "one weight per loss_type"),
    (dict(loss_type="sft"), "'sft' alone is supervised fine-tuning"),
    (dict(loss_type=["sigmoid", "sigmoid"]), "a list of distinct ones"),
    (dict(loss_type=[]), "a list of distinct ones"),
    (dict(loss_type=["sigmoid", "kto"]), "one of sigmoid, hinge, ipo, robust, sft"),
    (dict(loss_type=["hinge", "sft"], label_smoothing=0.1), "label_smoothing"),
])
def test_bad_combined_losses_raise(kwargs, match):
    pc, pr, rc, rr, lc, lr = pair_logps()
    with pytest.raises(ValueError, match=match):
        dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **kwargs)
    with pytest.raises(ValueError, match="'sft' averages log-probs over tokens"):
        dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft"])


def test_combined_loss_is_the_weighted_sum_and_sft_is_the_chosen_token_nll():
    pc, pr, rc, rr, lc, lr = pair_logps(seed=4)
    sigmoid, metrics = dpo_loss(pc, pr, rc, rr, beta=0.3)
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    nll = -pc.sum() / lc.sum()
    rpo, rpo_metrics = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                                chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(rpo, sigmoid + 0.5 * nll)
    both, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=["ipo", "sigmoid"], chosen_lengths=lc,
                       rejected_lengths=lr)
    torch.testing.assert_close(both, ipo + sigmoid)  # default weights: 1 each
    assert all(torch.equal(metrics[k], rpo_metrics[k]) for k in metrics)  # the metrics are the preference's


@pytest.mark.parametrize("loss_type", [["sigmoid", "sft"], "ipo", "hinge"])
def test_pair_mask_leaves_padded_slots_out_of_loss_and_metrics(loss_type):
    real = pair_logps(num_pairs=4, seed=5)
    # Padded slots as a static batch holds them: empty answers (log-prob 0, no tokens), then garbage to show they
    # cannot leak in whatever they hold.
    padded = [torch.cat([t, t.new_zeros(3)]) for t in real]
    padded[0][-1] = 1e6
    mask = torch.arange(7) < 4
    kwargs = dict(beta=0.3, loss_type=loss_type)
    loss, metrics = dpo_loss(*real[:4], chosen_lengths=real[4], rejected_lengths=real[5], **kwargs)
    loss_p, metrics_p = dpo_loss(*padded[:4], chosen_lengths=padded[4], rejected_lengths=padded[5],
                                 pair_mask=mask, **kwargs)
    torch.testing.assert_close(loss_p, loss)
    for key in METRIC_NAMES:
        torch.testing.assert_close(metrics_p[key], metrics[key], msg=key)


def test_bad_shapes_raise():
    pc, pr, rc, rr, lc, _ = pair_logps()
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        dpo_loss(pc[None], pr, rc, rr)
    with pytest.raises(ValueError, match="at least one"):
        dpo_loss(pc[:0], pr[:0], rc[:0], rr[:0])
    with pytest.raises(ValueError, match="rejected_lengths"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lc[:-1])


# --- against TRL -----------------------------------------------------------------------------------------------
# TRL 1.16 has no free-standing DPO loss: the formulas live in the unbound method
# trl.trainer.dpo_trainer.DPOTrainer._compute_loss(self, model, inputs, return_outputs). It is called with a
# SimpleNamespace holding just the attributes it reads, precompute_ref_logps=True (so the reference log-probs
# come from `inputs`), and a stand-in model returning the per-token log-probs a fused LM head would.


def padded_batch(num_pairs=4, length=12, seed=0):
    """(per_token_logps [2P, L-1], completion_mask [2P, L]) laid out as TRL's padded chosen+rejected batch."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * num_pairs, length, dtype=torch.long)
    for row in range(2 * num_pairs):
        prompt = int(torch.randint(1, 4, (1,), generator=gen))
        completion = int(torch.randint(1, length - prompt + 1, (1,), generator=gen))
        mask[row, prompt:prompt + completion] = 1
    shift_mask = mask[:, 1:]
    logps = -torch.rand(2 * num_pairs, length - 1, generator=gen) * 6 * shift_mask
    return logps, mask


class StandInModel:
    """Callable in place of a causal LM: returns the given per-token log-probs as TRL's fused head would."""

    training = False

    def __init__(self, per_token_logps):
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        assert kwargs.get("fused_lm_head") is True
        zeros = torch.zeros_like(self.per_token_logps.detach())
        return SimpleNamespace(log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())


def trl_dpo(per_token_logps, completion_mask, ref_chosen, ref_rejected, beta, loss_type, label_smoothing,
            loss_weights=None):
    """(loss, logged metrics) from TRL's DPOTrainer._compute_loss on a stand-in trainer (loss_type: a name or a
    list of names, summed with loss_weights as TRL does)."""
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    import trl  # noqa: F401  (the baseline extra installs it)
    from trl.trainer.dpo_trainer import DPOTrainer

    model = StandInModel(per_token_logps)
    identity = lambda tensor: tensor  # noqa: E731 - single process: gathering is the identity
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity,
                                                 gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=loss_types, loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {name: values[-1] for name, values in trainer._metrics["eval"].items()}


def ours_from_padded(per_token_logps, completion_mask, ref_chosen, ref_rejected, **kwargs):
    """dpo_loss on the per-sequence sums and completion lengths of the padded batch."""
    num_pairs = ref_chosen.shape[0]
    sums = per_token_logps.sum(dim=1)
    lengths = completion_mask[:, 1:].sum(dim=1)
    return dpo_loss(sums[:num_pairs], sums[num_pairs:], ref_chosen, ref_rejected, chosen_lengths=lengths[:num_pairs],
                    rejected_lengths=lengths[num_pairs:], **kwargs)


def trl_inputs(seed: int):
    """(completion mask, ref_chosen, ref_rejected, per-token log-probs for TRL, the same for us) of one padded
    batch: the log-probs as two separate leaves, so each side gets its own gradient."""
    logps, mask = padded_batch(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    ref_chosen, ref_rejected = (-torch.rand(logps.shape[0] // 2, generator=gen) * 30 for _ in range(2))
    return mask, ref_chosen, ref_rejected, logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)


# TRL 1.16's "sigmoid" ignores label_smoothing (its config documents smoothing for robust/EXO only); the
# smoothed sigmoid (conservative DPO) is compared with TRL's "aot" below instead.
TRL_CASES = [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0), ("robust", 0.2)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type, smoothing", TRL_CASES)
def test_matches_trl_loss_gradients_and_metrics(loss_type, smoothing, beta):
    mask, ref_chosen, ref_rejected, trl_logps, our_logps = trl_inputs(seed=10)

    trl_loss, trl_metrics = trl_dpo(trl_logps, mask, ref_chosen, ref_rejected, beta, loss_type, smoothing)
    loss, metrics = ours_from_padded(our_logps, mask, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                                     label_smoothing=smoothing)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    trl_loss.backward()
    loss.backward()
    assert trl_logps.grad.abs().sum() > 0
    torch.testing.assert_close(our_logps.grad, trl_logps.grad, rtol=1e-5, atol=1e-7)
    assert set(metrics) == METRIC_NAMES and METRIC_NAMES <= set(trl_metrics)
    for name in METRIC_NAMES:
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("loss_types, weights", [(["sigmoid", "sft"], [1.0, 0.7]), (["ipo", "sft"], None),
                                                  (["sigmoid", "hinge"], [0.3, 2.0])])
def test_combined_losses_match_trl(loss_types, weights):
    # TRL 1.x sums the loss types with loss_weights; its "sft" is the mean NLL of every chosen token (RPO).
    mask, ref_chosen, ref_rejected, trl_logps, our_logps = trl_inputs(seed=14)
    trl_loss, _ = trl_dpo(trl_logps, mask, ref_chosen, ref_rejected, 0.2, loss_types, 0.0,
                          loss_weights=weights)
    loss, _ = ours_from_padded(our_logps, mask, ref_chosen, ref_rejected, beta=0.2, loss_type=loss_types,
                               loss_weights=weights)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    trl_loss.backward()
    loss.backward()
    # Compared on completion tokens: TRL's "sft" indexes them, while a padded position (log-prob 0 here) still sits
    # in the per-sequence sums; the fused head never has such positions.
    completion = mask[:, 1:].bool()
    torch.testing.assert_close(our_logps.grad[completion], trl_logps.grad[completion], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_smoothed_sigmoid_matches_trl_conservative_dpo(smoothing):
    # TRL's "aot" applies the conservative-DPO formula -(1-e) logsig(b d) - e logsig(-b d) to sorted log-ratios;
    # with one pair per call the sort is the identity, so averaging per-pair calls is smoothed sigmoid DPO.
    mask, ref_chosen, ref_rejected, trl_logps, our_logps = trl_inputs(seed=12)
    num_pairs = ref_chosen.shape[0]
    per_pair = [trl_dpo(trl_logps[[i, num_pairs + i]], mask[[i, num_pairs + i]], ref_chosen[i:i + 1],
                        ref_rejected[i:i + 1], 0.3, "aot", smoothing)[0] for i in range(num_pairs)]
    trl_loss = torch.stack(per_pair).mean()
    loss, _ = ours_from_padded(our_logps, mask, ref_chosen, ref_rejected, beta=0.3, label_smoothing=smoothing)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    trl_loss.backward()
    loss.backward()
    torch.testing.assert_close(our_logps.grad, trl_logps.grad, rtol=1e-5, atol=1e-7)

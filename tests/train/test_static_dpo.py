"""The DPO step on static (CUDA-graph) batches, on CPU: its loss, metrics and every gradient equal the eager step's on
the same pairs (a full batch and one with empty pair slots, both reference settings), several AdamW steps train
alike, the step makes no host sync, and a `python -m mrgfast.train` DPO run with cuda_graphs=true logs the same
losses as without; on CUDA, a DPO run with cuda_graphs replays its steps. (The batches themselves:
tests/data/test_static_dpo.py; graph replay == eager on CUDA: tests/training/test_cuda_graph.py.)"""

import copy

import pytest
import torch

from mrgfast.assemble import build_all
from mrgfast.common.rng import seed_everything
from mrgfast.data.static_dpo import StaticDPOShape, make_static_dpo, padded_pair_values
from mrgfast.testing.sync_guard import no_host_sync
from mrgfast.train import setup, train
from mrgfast.training import steps
from mrgfast.training.steps import DPO_METRICS, MicroBatch, StepSettings, dpo_loss, pair_count, prepare, train_step
from tests.tiny_run import cache  # noqa: F401 (a fixture)
from tests.tiny_run import DEMO, host_batches, logged, tiny, tiny_cuda, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")
RPO = StepSettings(mode="dpo", beta=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])


def dpo_run(cache, out, *extra):
    """The tiny DPO run's pieces (two rows of pairs a batch, unshuffled), its LoRA moved off zero so the policy
    differs from the adapters-off reference, and its static DPO shape."""
    seed_everything(0)
    pieces = build_all(tiny(cache, out, "mode=dpo", "data.shuffle=false", "data.rows=2", *extra),
                       torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pieces.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    packed = pieces.packed
    return pieces, StaticDPOShape.for_lengths(packed.lengths, packed.budget, packed.rows)


def reference_logps(batch, static: bool, shape: StaticDPOShape):
    """Made-up precomputed reference log-probs [2P] of a batch (at the pair slots for a static one)."""
    logps = -torch.arange(1.0, 2 * pair_count(batch) + 1) * 7.0
    return padded_pair_values(logps, shape.max_pairs) if static else logps


@pytest.mark.parametrize("reference", ["disabled_adapters", "precomputed"])
def test_static_dpo_loss_metrics_and_gradients_equal_eager(cache, tmp_path, reference):
    pieces, shape = dpo_run(cache, tmp_path)
    model = pieces.model.eval()  # no dropout: both calls see the same network
    params = [p for p in model.parameters() if p.requires_grad]
    batches, _ = host_batches(pieces, 2)
    assert pair_count(batches[0]) == shape.max_pairs > pair_count(batches[1])  # full, and empty pair slots
    for host in batches:
        results = []
        for static in (False, True):
            ref = reference_logps(host, static, shape) if reference == "precomputed" else None
            batch = prepare(copy.deepcopy(host), "cpu", shape if static else None)
            loss, metrics = dpo_loss(model, MicroBatch(batch, torch.ones(()), torch.ones(()), ref), RPO)
            results.append((loss, metrics, torch.autograd.grad(loss, params)))
        (loss, metrics, grads), (static_loss, static_metrics, static_grads) = results
        # Equal up to float rounding: attention over the whole stream (static) and per document (eager) sum in other
        # orders, and the rewards are differences of log-probs near -150 (float32 resolution about 1e-5).
        torch.testing.assert_close(static_loss, loss, rtol=1e-6, atol=1e-7)
        for key in DPO_METRICS:
            torch.testing.assert_close(static_metrics[key], metrics[key], rtol=1e-6, atol=1e-5, msg=key)
        for a, b in zip(static_grads, grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert any(g.abs().max() > 0 for g in grads)


def test_static_dpo_steps_train_like_eager_ones(cache, tmp_path):
    runs = []
    for static in (False, True):
        pieces, shape = dpo_run(cache, tmp_path / str(static), "optim.grad_accum_steps=2")
        model = pieces.model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        batches, _ = host_batches(pieces, 2)
        counts = [pair_count(b) for b in batches]
        micros = [MicroBatch(prepare(copy.deepcopy(b), "cpu", shape if static else None), torch.tensor(sum(counts)),
                             torch.tensor(c / sum(counts))) for b, c in zip(batches, counts)]
        outputs = [train_step(model, pieces.optimizer, micros, RPO, params) for _ in range(3)]
        runs.append((outputs, [p.detach().clone() for p in params]))
    (eager, eager_params), (static, static_params) = runs
    for a, b in zip(static, eager):
        for key in ("loss", "grad_norm", *DPO_METRICS):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)  # rewards: see above
    for a, b in zip(static_params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reference", ["disabled_adapters", "precomputed"])
def test_static_dpo_step_is_host_sync_free(cache, tmp_path, reference):
    pieces, shape = dpo_run(cache, tmp_path, "optim.grad_accum_steps=2")
    params = [p for p in pieces.model.parameters() if p.requires_grad]
    batches, _ = host_batches(pieces, 2)
    counts = [pair_count(b) for b in batches]
    micros = [MicroBatch(prepare(b, "cpu", shape), torch.tensor(sum(counts)), torch.tensor(c / sum(counts)),
                         reference_logps(b, True, shape) if reference == "precomputed" else None)
              for b, c in zip(batches, counts)]
    with no_host_sync():
        out = train_step(pieces.model, pieces.optimizer, micros, RPO, params)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["grad_norm"])


def test_dpo_run_with_cuda_graphs_logs_the_losses_of_one_without(cache, tmp_path):
    # On CPU the step runs eagerly on the batches as they come (no graph to replay): the same run as without.
    from mrgfast.train.__main__ import main
    losses = []
    for graphs in ("false", "true"):
        out = tmp_path / graphs
        assert main([f"config={DEMO}", *tiny_overrides(cache), "mode=dpo", "schedule.max_steps=3",
                     f"output_dir={out}", f"cuda_graphs={graphs}"]) == 0
        losses.append([r["loss"] for r in logged(out)])
    assert len(losses[0]) == 3 and losses[1] == losses[0]


def test_dpo_run_on_static_batches_trains_like_one_without(cache, tmp_path, monkeypatch):
    # The run as CUDA would make it (static batches, reference log-probs at the pair slots), eager on CPU.
    runs, made = {}, []
    for graphs in ("false", "true"):
        config = tiny(cache, tmp_path / graphs, "mode=dpo", "dpo.reference=precomputed", "schedule.max_steps=4",
                      "optim.lr=1e-2", "data.rows=2", "lora.lora_dropout=0.0", f"cuda_graphs={graphs}")
        if graphs == "true":
            monkeypatch.setattr(setup, "static_shape_of", lambda config, device, packed: StaticDPOShape.for_lengths(
                packed.lengths, packed.budget, packed.rows) if config.cuda_graphs else None)
            monkeypatch.setattr(steps, "make_static_dpo", lambda *args: made.append(1) or make_static_dpo(*args))
        runs[graphs] = train(config).history
    eager, static = runs["false"], runs["true"]
    assert len(made) == 4  # every step's batch was a static one
    assert [r["loss"] for r in eager] != [eager[0]["loss"]] * 4  # it trains
    # rewards/accuracies left out: at step 1 the policy is the reference (LoRA starts at zero), every reward ties at
    # 0 up to rounding, and rounding decides the ties (its equality is tested above, off the ties).
    for a, b in zip(static, eager):
        for key in ("loss", "grad_norm", *(k for k in DPO_METRICS if k != "rewards/accuracies")):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("reference", ["disabled_adapters", "precomputed"])
def test_dpo_train_on_cuda_logs_graph_use(tmp_path, reference):
    result = train(tiny_cuda(tmp_path, "mode=dpo", f"dpo.reference={reference}", "schedule.max_steps=6",
                             "telemetry.log_every=1", "cuda_graphs=true"))
    last = result.history[-1]
    assert result.step == 6 and torch.isfinite(torch.tensor(last["loss"]))
    # Warm-up steps run eagerly, then every step replays the graph: static DPO batches share one signature.
    assert last["graph_eager_steps"] == 3 and last["graph_replays"] == 3

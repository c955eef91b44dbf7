"""mrgfast.training.cuda_graph: on CPU the StepRunner runs eagerly and graph signatures ignore bookkeeping; on CUDA
(skipped without it) a whole training step (forward, backward, clipping, fused capturable AdamW with a tensor LR)
captured in a CUDA graph and replayed matches the same steps run eagerly, and so does the real training step
(MultimodalLM + LoRA + fused loss + capturable AdamW) on static batches of different packing layouts, captured and
replayed by StepRunner, and the DPO step on static shared-prompt batches (both reference settings)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrgfast.assemble import build_all
from mrgfast.common.rng import seed_everything
from mrgfast.data.static_batch import StaticShape
from mrgfast.data.static_dpo import StaticDPOShape, padded_pair_values
from mrgfast.training.cuda_graph import StepRunner, signature
from mrgfast.training.guards import NonFiniteGuard
from mrgfast.training.optim import build_adamw
from mrgfast.training.schedule import WarmupSchedule
from mrgfast.training.steps import MicroBatch, StepSettings, pair_count, prepare, supervised_tokens, train_step
from tests.tiny_run import cache  # noqa: F401 (a fixture)
from tests.tiny_run import host_batches, tiny, tiny_cuda

WARMUP_STEPS = 3  # eager steps before capture (allocator and autograd warm-up), as torch's docs do
STEPS = 8
RUNNER_STEPS = 6


@pytest.mark.usefixtures("one_thread")
def test_step_runner_is_eager_on_cpu_and_signatures_ignore_bookkeeping(cache, tmp_path):
    config = tiny(cache, tmp_path, "data.shuffle=false")
    pieces = build_all(config, torch.device("cpu"))
    (first, second), _ = host_batches(pieces, 2)
    calls = []
    runner = StepRunner(lambda inputs: calls.append(inputs) or {"loss": torch.zeros(())}, "cpu", enabled=True)
    assert not runner.enabled and runner({"x": first})["loss"] == 0 and calls == [{"x": first}]
    assert runner.stats() == {}
    relabelled = copy.deepcopy(first)
    relabelled.sample_ids = ["other"] * len(first.sample_ids)
    relabelled.input_ids = relabelled.input_ids.flip(-1)  # values change, shapes and host structure do not
    assert signature(relabelled) == signature(first)
    assert signature(second) != signature(first)  # other documents: a graph captured on `first` cannot replay it


def make(device):
    """Seeded model, fused capturable AdamW with a tensor LR, warmup + cosine schedule."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).to(device)
    opt = build_adamw(model.parameters(), 1e-2, device, weight_decay=0.1)
    return model, opt, WarmupSchedule(opt, STEPS, 2)


def step(model, opt, x, y):
    """One optimizer step on (x, y) without host syncs; returns the loss tensor."""
    loss = F.mse_loss(model(x), y)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=False)
    return loss


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replay_matches_eager():
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(1)
    batches = [(torch.randn(8, 16, device=device, generator=g), torch.randn(8, 4, device=device, generator=g))
               for _ in range(STEPS)]

    model, opt, sched = make(device)
    eager = []
    for x, y in batches:
        eager.append(step(model, opt, x, y).detach().clone())
        sched.step()

    model_g, opt_g, sched_g = make(device)
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    guard = NonFiniteGuard(device)
    graphed = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:WARMUP_STEPS]:
            static_x.copy_(x)
            static_y.copy_(y)
            graphed.append(step(model_g, opt_g, static_x, static_y).detach().clone())
            sched_g.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model_g, opt_g, static_x, static_y)
    for index, (x, y) in enumerate(batches[WARMUP_STEPS:], WARMUP_STEPS):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        guard.observe(static_loss, index, [index])
        graphed.append(static_loss.detach().clone())
        sched_g.step()  # writes the captured LR tensor in place for the next replay
    guard.check()
    torch.testing.assert_close(torch.stack(graphed), torch.stack(eager), rtol=1e-5, atol=1e-6)
    for p_graph, p_eager in zip(model_g.parameters(), model.parameters()):
        torch.testing.assert_close(p_graph, p_eager, rtol=1e-5, atol=1e-6)
    assert float(opt_g.param_groups[0]["lr"]) == pytest.approx(sched.get_last_lr()[0], rel=1e-6)


def micro_batches(pieces, device):
    """Static micro-batches of two different packing groups (other documents, other images), as train() makes
    them for CUDA graphs: both replay the same captured graph."""
    shape = StaticShape.for_lengths(pieces.packed.lengths, pieces.packed.budget, pieces.packed.rows)
    one = torch.ones((), device=device)
    out = []
    for group in pieces.packed.batches()[:2]:
        batch = pieces.collator([pieces.dataset[i] for i in group])
        norm = torch.tensor(float(supervised_tokens(batch)), device=device)
        out.append([MicroBatch(prepare(batch, device, shape), norm, one)])
    assert signature(out[0]) == signature(out[1])
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_runner_replay_matches_eager(tmp_path):
    device = torch.device("cuda")
    config = tiny_cuda(tmp_path)
    results = []
    for graphed in (False, True):
        seed_everything(0)
        pieces = build_all(config, device)
        params = [p for p in pieces.model.parameters() if p.requires_grad]
        inputs = micro_batches(pieces, device)
        settings = StepSettings(max_grad_norm=1.0)
        runner = StepRunner(lambda m: train_step(pieces.model, pieces.optimizer, m, settings, params,
                                                 static_grads=True), device, enabled=graphed, warmup=2)
        losses = []
        for step in range(RUNNER_STEPS):
            losses.append(runner(inputs[step % 2])["loss"].clone())
            pieces.schedule.step()
        torch.cuda.synchronize()
        results.append((torch.stack(losses).cpu(), [p.detach().cpu().clone() for p in params], runner))
    (eager_losses, eager_params, _), (graph_losses, graph_params, runner) = results
    assert runner.replays == RUNNER_STEPS - 2 and runner.eager_steps == 2
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for a, b in zip(graph_params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def dpo_micro_batches(pieces, device, precomputed: bool):
    """Static DPO micro-batches of two packing groups with different pair counts (made-up reference log-probs at
    the pair slots when `precomputed`): both replay the same captured graph."""
    packed = pieces.packed
    shape = StaticDPOShape.for_lengths(packed.lengths, packed.budget, packed.rows)
    one = torch.ones((), device=device)
    out = []
    for group in packed.batches()[:2]:
        batch = pieces.collator([pieces.dataset[i] for i in group])
        pairs = pair_count(batch)
        ref = padded_pair_values(-torch.arange(1.0, 2 * pairs + 1) * 7.0, shape.max_pairs).to(device)
        out.append([MicroBatch(prepare(batch, device, shape), one, one, ref if precomputed else None)])
    assert signature(out[0]) == signature(out[1])
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("reference", ["disabled_adapters", "precomputed"])
def test_dpo_step_runner_replay_matches_eager(tmp_path, reference):
    device = torch.device("cuda")
    config = tiny_cuda(tmp_path, "mode=dpo", "data.rows=2", f"dpo.reference={reference}")
    settings = StepSettings(mode="dpo", beta=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    results = []
    for graphed in (False, True):
        seed_everything(0)
        pieces = build_all(config, device)
        params = [p for p in pieces.model.parameters() if p.requires_grad]
        inputs = dpo_micro_batches(pieces, device, reference == "precomputed")
        runner = StepRunner(lambda m: train_step(pieces.model, pieces.optimizer, m, settings, params,
                                                 static_grads=True), device, enabled=graphed, warmup=2)
        outputs = []
        for step in range(RUNNER_STEPS):
            out = runner(inputs[step % 2])
            outputs.append(torch.stack([out[k].detach().float().reshape(()) for k in sorted(out)]).clone())
            pieces.schedule.step()
        torch.cuda.synchronize()
        results.append((torch.stack(outputs).cpu(), [p.detach().cpu().clone() for p in params], runner))
    (eager_out, eager_params, _), (graph_out, graph_params, runner) = results
    assert runner.replays == RUNNER_STEPS - 2 and runner.eager_steps == 2
    torch.testing.assert_close(graph_out, eager_out, rtol=1e-4, atol=1e-5)  # loss, grad_norm and the DPO metrics
    for a, b in zip(graph_params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

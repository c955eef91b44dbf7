"""CUDA only: a whole training step (forward, backward, clipping, fused capturable AdamW with a tensor LR)
captured in a CUDA graph and replayed matches the same steps run eagerly. Skipped without CUDA."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrgfast.training.guards import NonFiniteGuard
from mrgfast.training.optim import build_adamw
from mrgfast.training.schedule import WarmupSchedule



WARMUP_STEPS = 3  # eager steps before capture (allocator and autograd warm-up), as torch's docs do
STEPS = 8


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

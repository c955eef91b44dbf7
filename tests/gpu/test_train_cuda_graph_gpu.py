"""CUDA only: the real training step (MultimodalLM + LoRA + fused loss + capturable AdamW) on static batches of
different packing layouts, captured by mrgfast.training.cuda_graph.StepRunner and replayed, matches the same steps
run eagerly; train() with cuda_graphs replays every step after the warm-up."""

from pathlib import Path

import torch

from mrgfast.train import train
from mrgfast.training.build import build_all
from mrgfast.training.config import load_config
from mrgfast.data.static_batch import StaticShape
from mrgfast.training.cuda_graph import StepRunner, signature
from mrgfast.common.rng import seed_everything
from mrgfast.training.steps import MicroBatch, StepSettings, prepare, supervised_tokens, train_step

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
STEPS = 6


def tiny(tmp_path, *extra):
    """The demo config shrunk to a tiny fp32 model on CUDA."""
    return load_config(DEMO, ["model.hidden_size=32", "model.intermediate_size=64", "model.vision_dim=16",
                              f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic_n=12",
                              "data.synthetic_size=32", "data.synthetic_volumes=0", "data.token_budget=256",
                              "data.rows=1", "data.max_length=256", "data.shuffle=false", "device=cuda",
                              "model.dtype=float32", "lora.lora_dropout=0.0", "telemetry.progress_bar=false",
                              f"output_dir={tmp_path / 'run'}", "resume=none", *extra])


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


def test_graph_replay_matches_eager(tmp_path):
    device = torch.device("cuda")
    config = tiny(tmp_path)
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
        for step in range(STEPS):
            losses.append(runner(inputs[step % 2])["loss"].clone())
            pieces.schedule.step()
        torch.cuda.synchronize()
        results.append((torch.stack(losses).cpu(), [p.detach().cpu().clone() for p in params], runner))
    (eager_losses, eager_params, _), (graph_losses, graph_params, runner) = results
    assert runner.replays == STEPS - 2 and runner.eager_steps == 2
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for a, b in zip(graph_params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_train_on_cuda_logs_graph_use(tmp_path):
    result = train(tiny(tmp_path, "schedule.max_steps=6", "telemetry.log_every=1", "cuda_graphs=true"))
    last = result.history[-1]
    assert result.step == 6 and torch.isfinite(torch.tensor(last["loss"]))
    # Warm-up steps run eagerly, then every step replays the graph: static batches share one signature.
    assert last["graph_eager_steps"] == 3 and last["graph_replays"] == 3

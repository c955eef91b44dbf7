"""One optimizer step of the loop: the host side (micro-batches, global normalisers), the (graph-captured) device
step, the schedule and the NaN watch; the guard's checks where the loop reads values anyway; and the logged record of
a step."""

import torch
from torch import nn

from mrgfast.data.static_dpo import StaticDPOShape, padded_pair_values
from mrgfast.train.setup import RunState
from mrgfast.training.distributed import all_reduce_max, all_reduce_sum
from mrgfast.training.guards import max_abs
from mrgfast.training.steps import MicroBatch, batch_reference_logps, pair_count, prepare, supervised_tokens
from mrgfast.training.telemetry import Telemetry
from mrgfast.training.throughput import attention_flops


def take_step(state: RunState) -> tuple:
    """Run the next optimizer step; returns (the step's device outputs, the learning rate it ran at)."""
    config, ctx, device = state.config, state.ctx, state.ctx.device
    # Host side, outside the step: fetch the micro-batches, count the global normalisers.
    host = [next(state.batches) for _ in range(config.optim.grad_accum_steps)]
    ids = [i for b in host for i in b.sample_ids]
    tokens = sum(b.num_tokens for b in host)
    counts = [supervised_tokens(b) if config.mode == "sft" else pair_count(b) for b in host]
    norm = all_reduce_sum(ctx, torch.tensor(float(sum(counts)), device=device))
    # SFT divides by the global token count inside the loss; DPO weights each micro-batch's mean.
    shares = [torch.ones((), device=device) if config.mode == "sft" else c / norm for c in counts]
    digest_images = state.core.feature_cache is not None  # cache keys hashed on the host, outside the step
    micros = [MicroBatch(prepare(b, device, state.static_shape, digest_images), norm, share,
                         reference_logps(state, b)) for b, share in zip(host, shares)]
    lr = state.pieces.schedule.get_last_lr()[0]
    outputs = state.runner(micros)
    state.step += 1
    state.consumed += config.optim.grad_accum_steps * ctx.world_size
    state.pieces.schedule.step()
    state.guard.observe(outputs["loss"], state.step, ids, outputs["grad_norm"])
    decoder = state.core.decoder.config
    documents = [document for b in host for document in b.attention_documents()]
    state.telemetry.step_done(tokens, attention_flops(documents, decoder.num_hidden_layers,
                                                      decoder.num_attention_heads * decoder.head_dim))
    return outputs, lr


def reference_logps(state: RunState, batch):
    """The precomputed reference log-probs of a host-side DPO batch on the device (at a static batch's pair
    slots), or None when the step computes its reference itself."""
    if state.ref_logps is None:
        return None
    logps = batch_reference_logps(state.ref_logps, batch, state.ref_path)
    if isinstance(state.static_shape, StaticDPOShape):
        logps = padded_pair_values(logps, state.static_shape.max_pairs)
    return logps.to(state.ctx.device)


def check_guard(state: RunState) -> int:
    """The guard's checks on what the steps since the last check saw and on the weights now (raises to stop the
    run); returns the steps skipped so far."""
    skipped = state.guard.check()
    largest = all_reduce_max(state.ctx, max_abs(state.params, state.ctx.device))
    state.guard.check_weights(float(largest), state.step)
    return skipped


def log_step(state: RunState, outputs: dict, lr: float) -> dict:
    """Check the steps since the last log (check_guard), then write the step's record (summed over ranks)."""
    skipped = check_guard(state)
    extra = cache_stats(state.core)
    if state.guard.skip:
        extra["skipped_steps"] = skipped
    extra.update(state.next_log)
    state.next_log = {}
    return log_metrics(state.ctx, state.telemetry, state.step, outputs, lr, state.runner, extra)


def cache_stats(core: nn.Module) -> dict:
    """The feature cache's counts for the metrics log (this rank's), or nothing without a cache."""
    cache = getattr(core, "feature_cache", None)
    if cache is None:
        return {}
    return {"vision_cache_hits": cache.hits, "vision_cache_misses": cache.stats["misses"]}


def log_metrics(ctx, telemetry: Telemetry, step: int, outputs: dict, lr: float, runner, extra=None) -> dict:
    """Sum the step's outputs over ranks (each rank's loss is its share of the global one), read them once and
    write a record."""
    values = {k: all_reduce_sum(ctx, v.detach().float().reshape(())) for k, v in outputs.items()
              if k != "grad_norm"}
    record = {k: float(v) for k, v in values.items()}
    if "grad_norm" in outputs:
        record["grad_norm"] = float(outputs["grad_norm"])
    record["lr"] = lr
    record.update(runner.stats())
    record.update(extra or {})
    return telemetry.log(step, record)

"""The training loop: `torchrun [--nproc_per_node N] -m mrgfast.train [config=configs/x.yaml] [key=value ...]`.

With no arguments it runs the embedded demo (mrgfast.demo.main). Reads top to bottom: config -> process group
-> data, model, optimizer (mrgfast.training.build) -> resume -> steps (mrgfast.training.steps) with telemetry,
NaN guard, SIGTERM handling and checkpoints -> TrainResult.
"""

import gc
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from mrgfast.common.rng import capture_rng_state, restore_rank_rng_state, seed_everything
from mrgfast.data.packing import PackedBatchSampler
from mrgfast.data.static_batch import StaticShape
from mrgfast.peft import load_adapter
from mrgfast.training.build import ADAPTER_SUFFIX, MODULES_GROUP, build_all, build_loader
from mrgfast.training.checkpoint import (adapter_writer, load_optimizer_state, read_checkpoint, resolve_resume,
                                         save_checkpoint)
from mrgfast.training.config import ConfigError, TrainConfig, parse_cli, save_resolved
from mrgfast.training.cuda_graph import StepRunner
from mrgfast.training.distributed import (all_reduce_sum, any_rank, barrier, gather_objects, init_distributed,
                                          teardown, wrap_model)
from mrgfast.training.fsdp import (adapter_tensors, gather_full_state, read_adapter_by_name, scatter_full_state,
                                   shard_model)
from mrgfast.training.guards import GracefulStop, NonFiniteGuard, NonFiniteLossError
from mrgfast.training.periodic_eval import PeriodicEval, eval_due
from mrgfast.training.steps import (MicroBatch, StepSettings, batch_reference_logps, load_reference_logps,
                                    pair_count, precompute_reference_logps, prepare, save_reference_logps,
                                    supervised_tokens, train_step)
from mrgfast.training.telemetry import Telemetry
from mrgfast.training.throughput import training_flops_per_token


@dataclass
class TrainResult:
    """What a run leaves: where, its last checkpoint, the last logged metrics, every logged record, the model, and
    the headline metrics of each evaluation during training (main process). An FSDP2 model keeps the process group's
    threads running until the result is dropped and garbage-collected (`gc.collect()`), as main() does."""

    output_dir: Path
    checkpoint: Optional[Path]
    metrics: dict
    model: nn.Module
    step: int
    stopped_early: bool = False
    history: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)


def train(config: TrainConfig, on_step: Optional[Callable[[int, dict], None]] = None) -> TrainResult:
    """Run `config` to schedule.max_steps (resuming when asked); `on_step(step, outputs)` is called after each step."""
    ctx = init_distributed(config.device, config.distributed.backend, config.distributed.timeout_s)
    try:
        return run(config, ctx, on_step)
    finally:
        teardown(ctx)


def run(config: TrainConfig, ctx, on_step) -> TrainResult:
    """train() inside the process group."""
    out_dir, device = Path(config.output_dir), ctx.device
    if ctx.is_main:
        save_resolved(config, out_dir)
    seed_everything(config.seed)
    fsdp = config.distributed.strategy == "fsdp" and ctx.distributed
    sharded = fsdp and config.distributed.shard_trainable  # trainables and their AdamW state are DTensors
    pieces = build_all(config, device, lambda m: shard_model(m, ctx, sharded) if fsdp else wrap_model(m, ctx, "ddp"))
    core, model, optimizer, schedule = pieces.model, pieces.wrapped, pieces.optimizer, pieces.schedule
    core.train()
    params = [p for p in core.parameters() if p.requires_grad]
    accum, world = config.optim.grad_accum_steps, ctx.world_size
    bf16 = device.type == "cuda" and config.model.dtype in ("auto", "bfloat16")
    settings = StepSettings(config.mode, world, config.optim.max_grad_norm, config.dpo.beta, config.dpo.loss_type,
                            config.dpo.label_smoothing, torch.bfloat16 if bf16 else None,
                            average_gradients=fsdp and not sharded,  # sharded: FSDP2 reduce-scatters them
                            loss_weights=config.dpo.loss_weights)
    ref_logps, ref_path = None, None
    if config.mode == "dpo" and config.dpo.reference == "precomputed":
        ref_path = Path(config.dpo.reference_logps_path or out_dir / "reference_logps.safetensors")
        ref_logps = reference_logps(pieces, config, ctx, ref_path, settings.autocast_dtype)

    # Resume: read the checkpoint, start the data where it stopped, then restore state (RNG last, so the
    # DataLoader's own draw at iterator creation happens exactly as in an uninterrupted run).
    resume = resolve_resume(config.resume, out_dir)
    ckpt = read_checkpoint(resume) if resume is not None else None
    step = ckpt.step if ckpt else 0
    consumed = ckpt.sampler["consumed"] if ckpt else 0
    batches = iter(build_loader(pieces, config, ctx.rank, world, consumed))
    if ckpt:
        restore(core, optimizer, schedule, ckpt, ctx.rank, sharded)

    total_params = sum(p.numel() for p in core.parameters())
    telemetry = Telemetry(out_dir, config.schedule.max_steps, training_flops_per_token(total_params, len_of(params)),
                          device, initial_step=step, main_process=ctx.is_main, jsonl=config.telemetry.jsonl,
                          tensorboard=config.telemetry.tensorboard, progress_bar=config.telemetry.progress_bar,
                          gpu_sample_interval_s=config.telemetry.gpu_sample_interval_s)
    guard = NonFiniteGuard(device)
    # Only the main process evaluates (the others wait at the barrier after it); its samples are read now, so a
    # bad eval.split fails before the first step.
    evaluator = PeriodicEval(config, out_dir, step if ckpt else None) if config.eval.enabled and ctx.is_main else None
    evaluations = []
    static_shapes = config.cuda_graphs and device.type == "cuda"  # a captured graph replays fixed shapes
    digest_images = core.feature_cache is not None  # cache keys hashed on the host, outside the step
    packed = pieces.packed
    static_shape = StaticShape.for_lengths(packed.lengths, packed.budget, packed.rows) if static_shapes else None
    runner = StepRunner(lambda micros: train_step(model, optimizer, micros, settings, params,
                                                  static_grads=static_shapes),
                        device, enabled=config.cuda_graphs)
    history, metrics, last_ckpt, stopped = [], {}, resume, False
    saved_at = step if ckpt else None

    def evaluate(at: int) -> None:
        """Evaluate the model as it is after step `at` (main process); every rank waits for it."""
        if evaluator is not None:
            record = evaluator.run(core, pieces.tokenizer, pieces.builder, pieces.dataset.media_config, at)
            telemetry.throughput.exclude(record["seconds"])
            telemetry.log_eval(at, record)
            evaluations.append({"step": at, **record})
            print(f"[eval] step {at}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()), file=sys.stderr)
        barrier(ctx)

    def checkpoint(at: int) -> Path:
        """Save (rank 0) after checking that no loss since the last check was NaN/inf."""
        guard.check()
        rng = gather_objects(ctx, capture_rng_state())
        full = gather_full_state(core, optimizer) if sharded else None  # collective: every rank takes part
        path = None
        if ctx.is_main:
            modules, adapter, state = saved_weights(core, optimizer, full, config.lora.enabled)
            writers = {ADAPTER_SUFFIX: adapter_writer(core.decoder, adapter)} if config.lora.enabled else {}
            path = save_checkpoint(out_dir, at, tensors={MODULES_GROUP: modules}, optimizer_state=state,
                                   scheduler=schedule, sampler={"consumed": consumed}, rng_states=rng,
                                   writers=writers, keep_last=config.checkpoint.keep_last)
        barrier(ctx)
        return path or out_dir / f"step-{at:06d}"

    try:
        with GracefulStop() as stop:
            while step < config.schedule.max_steps:
                # Host side, outside the step: fetch the micro-batches, count the global normalisers.
                host = [next(batches) for _ in range(accum)]
                ids = [i for b in host for i in b.sample_ids]
                tokens = sum(b.num_tokens for b in host)
                counts = [supervised_tokens(b) if config.mode == "sft" else pair_count(b) for b in host]
                norm = all_reduce_sum(ctx, torch.tensor(float(sum(counts)), device=device))
                # SFT divides by the global token count inside the loss; DPO weights each micro-batch's mean.
                shares = [torch.ones((), device=device) if config.mode == "sft" else c / norm for c in counts]
                micros = [MicroBatch(prepare(b, device, static_shape, digest_images), norm, share,
                                     None if ref_logps is None else
                                     batch_reference_logps(ref_logps, b, ref_path).to(device))
                          for b, share in zip(host, shares)]
                lr = schedule.get_last_lr()[0]
                outputs = runner(micros)
                step += 1
                consumed += accum * world
                schedule.step()
                guard.observe(outputs["loss"], step, ids)
                telemetry.step_done(tokens)
                if on_step is not None:
                    on_step(step, outputs)
                if step % config.telemetry.log_every == 0 or step == config.schedule.max_steps:
                    guard.check()
                    metrics = log_metrics(ctx, telemetry, step, outputs, lr, runner, cache_stats(core))
                    history.append(metrics)
                if eval_due(config, step):
                    evaluate(step)
                if step % config.checkpoint.every_steps == 0:
                    last_ckpt, saved_at = checkpoint(step), step
                if any_rank(ctx, stop.requested):
                    print(f"mrgfast.train: {stop.reason() or 'stop'} received at step {step}: saving and exiting",
                          file=sys.stderr)
                    stopped = True
                    break
            if (stopped or config.checkpoint.save_at_end) and saved_at != step:
                last_ckpt = checkpoint(step)
    finally:
        telemetry.close()
        if evaluator is not None:
            evaluator.close()
    return TrainResult(out_dir, last_ckpt, metrics, core, step, stopped, history, evaluations)


def len_of(params) -> int:
    """Total element count of a list of tensors."""
    return sum(p.numel() for p in params)


def saved_weights(core: nn.Module, optimizer, full, lora: bool) -> tuple:
    """(trainable weights outside the decoder, adapter tensors or None for the model's own, optimizer state) to
    save: the model's and optimizer's own, or taken from `full` (gather_full_state) when the trainables are
    sharded, so that the files are the same either way."""
    if full is None:
        return core.trainable_state_dict(), None, optimizer.state_dict()
    # trainable_state_dict's keys only: its values are this rank's shards.
    modules = {name: full.weights[name] for name in core.trainable_state_dict()}
    adapter = adapter_tensors(core, core.decoder, full.weights) if lora else None
    return modules, adapter, full.optimizer


def restore(core: nn.Module, optimizer, schedule, ckpt, rank: int, sharded: bool = False) -> None:
    """Put a checkpoint's weights, optimizer, schedule and this rank's RNG state back (`sharded`: into the
    FSDP2 shards of the trainables, a collective on every rank)."""
    adapter_dir = ckpt.path / ADAPTER_SUFFIX
    if sharded:
        weights = dict(ckpt.tensors.get(MODULES_GROUP, {}))
        if adapter_dir.is_dir():
            weights.update(read_adapter_by_name(core, core.decoder, adapter_dir))
        scatter_full_state(core, optimizer, weights, ckpt.optimizer, ckpt.path)
    else:
        if adapter_dir.is_dir():
            load_adapter(core.decoder, adapter_dir)
        core.load_trainable_state_dict(ckpt.tensors.get(MODULES_GROUP, {}))
        load_optimizer_state(optimizer, ckpt.optimizer, ckpt.path)
    schedule.load_state_dict(ckpt.scheduler)
    restore_rank_rng_state(ckpt.rng_states, rank, ckpt.path)


def reference_logps(pieces, config: TrainConfig, ctx, path: Path, autocast_dtype) -> dict:
    """Precomputed DPO reference log-probs: read from `path`, or computed by a first pass (every rank, rank 0
    writes) over one unshuffled epoch of the pairs."""
    if path.is_file():
        return load_reference_logps(path)
    packed = pieces.packed
    order = PackedBatchSampler(packed.lengths, packed.budget, packed.rows, seed=config.seed, shuffle=False)
    batches = (pieces.collator([pieces.dataset[i] for i in group]) for group in order.batches())
    logps = precompute_reference_logps(pieces.model, batches, ctx.device, autocast_dtype)
    if ctx.is_main:
        save_reference_logps(logps, path)
    barrier(ctx)
    return logps


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


def main(argv=None) -> int:
    """Command-line entry: no arguments -> the embedded demo; else `config=...` and `key=value` overrides."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        from mrgfast import demo  # imported lazily: the demo owns its own (heavier) orchestration
        return demo.main() or 0
    code = train_from_cli(argv)
    # An FSDP2 model holds the process group, and so its gloo/NCCL threads, through its device mesh, inside
    # reference cycles that outlive train_from_cli's frame: collect them now, while the interpreter is whole. Left to
    # interpreter shutdown, running group threads are the likely cause of the rare exit abort "terminate called
    # without an active exception".
    gc.collect()
    return code


def train_from_cli(argv: list) -> int:
    """Train the run that `config=...` and `key=value` overrides describe; returns the exit code."""
    try:
        config = parse_cli(argv)
        result = train(config)
    except ConfigError as err:
        print(f"mrgfast.train: config error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"mrgfast.train: {err}", file=sys.stderr)
        return 1
    print(f"mrgfast.train: finished at step {result.step}; checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

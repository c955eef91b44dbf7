"""Setting a run up inside its process group: the checkpoint it continues (train.resume), the built pieces, the
step's settings, DPO's reference log-probs, the resumed state and the loader positioned where the run stopped,
telemetry and the NaN guard."""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from mrgfast.assemble import Pieces, build_all, build_loader
from mrgfast.common.rng import restore_rank_rng_state, seed_everything
from mrgfast.config import RESOLVED_NAME, TrainConfig, config_text
from mrgfast.data.packing import PackedBatchSampler
from mrgfast.data.samples import describe_stats
from mrgfast.data.static_batch import StaticShape
from mrgfast.data.static_dpo import StaticDPOShape
from mrgfast.peft import load_adapter
from mrgfast.train.resume import open_run
from mrgfast.training.checkpoint import ADAPTER_SUFFIX, MODULES_GROUP, load_optimizer_state
from mrgfast.training.cuda_graph import StepRunner
from mrgfast.training.distributed import DistContext, barrier, wrap_model
from mrgfast.training.fsdp import read_adapter_by_name, scatter_full_state, shard_model
from mrgfast.training.guards import NonFiniteGuard
from mrgfast.training.optim import hyperparameters, keep_hyperparameters
from mrgfast.training.steps import (StepSettings, load_reference_logps, precompute_reference_logps,
                                    save_reference_logps, train_step)
from mrgfast.training.telemetry import Telemetry
from mrgfast.training.throughput import training_flops_per_token


@dataclass
class RunState:
    """Everything the loop reads and advances: built once by set_up, then `step` and `consumed` move on."""

    config: TrainConfig
    ctx: DistContext
    out_dir: Path
    pieces: Pieces
    params: list                      # the trainable parameters (what the step clips and AdamW updates)
    settings: StepSettings
    runner: StepRunner
    telemetry: Telemetry
    guard: NonFiniteGuard
    batches: object                   # this rank's micro-batches, from where the run stopped
    step: int
    consumed: int                     # global micro-batches drawn so far (the sampler's resume point)
    resumed_from: Optional[Path]      # the checkpoint the run continues, or None
    sharded: bool                     # trainables and their AdamW state are FSDP2 DTensors
    static_shape: Union[StaticShape, StaticDPOShape, None] = None   # CUDA graphs: every batch padded to one shape
    ref_logps: Optional[dict] = None  # DPO with dpo.reference=precomputed: {pair id: [chosen, rejected]}
    ref_path: Optional[Path] = None
    checkpoint_files: dict = field(default_factory=dict)  # written into every checkpoint (its config.yaml)
    next_log: dict = field(default_factory=dict)          # added to the next logged record (the data counts)

    @property
    def core(self) -> nn.Module:
        """The MultimodalLM itself (not its DDP wrapper)."""
        return self.pieces.model


def set_up(config: TrainConfig, ctx: DistContext) -> RunState:
    """Build the run of `config`, resume it when asked, and return the state the first step starts from."""
    out_dir, device = Path(config.output_dir), ctx.device
    ckpt = open_run(config, ctx, out_dir)
    seed_everything(config.seed)
    fsdp = config.distributed.strategy == "fsdp" and ctx.distributed
    sharded = fsdp and config.distributed.shard_trainable
    # A resumed run's checkpoint holds every trained weight: model.init_from is for the run's start only.
    pieces = build_all(config, device, lambda m: shard_model(m, ctx, sharded) if fsdp else wrap_model(m, ctx, "ddp"),
                       init_weights=ckpt is None)
    core = pieces.model
    core.train()
    data_stats = dict(pieces.dataset.stats)
    if ctx.is_main:
        print(f"mrgfast.train: data {config.data.path or 'synthetic twin'} ({config.data.split}): "
              f"{describe_stats(data_stats)}", file=sys.stderr)
    params = [p for p in core.parameters() if p.requires_grad]
    bf16 = device.type == "cuda" and config.model.dtype in ("auto", "bfloat16")
    settings = StepSettings(config.mode, ctx.world_size, config.optim.max_grad_norm, config.dpo.beta,
                            config.dpo.loss_type, config.dpo.label_smoothing, torch.bfloat16 if bf16 else None,
                            average_gradients=fsdp and not sharded,  # sharded: FSDP2 reduce-scatters them
                            loss_weights=config.dpo.loss_weights)
    ref_logps, ref_path = None, None
    if config.mode == "dpo" and config.dpo.reference == "precomputed":
        ref_path = Path(config.dpo.reference_logps_path or out_dir / "reference_logps.safetensors")
        ref_logps = reference_logps(pieces, config, ctx, ref_path, settings.autocast_dtype)

    # Resume: start the data where the checkpoint stopped, then restore state (RNG last, so the DataLoader's own
    # draw at iterator creation happens exactly as in an uninterrupted run).
    step = ckpt.step if ckpt else 0
    consumed = ckpt.sampler["consumed"] if ckpt else 0
    batches = iter(build_loader(pieces, config, ctx.rank, ctx.world_size, consumed))
    if ckpt:
        restore(core, pieces.optimizer, pieces.schedule, ckpt, ctx.rank, sharded)

    telemetry = Telemetry(out_dir, config.schedule.max_steps, decoder_flops_per_token(core.decoder), device, initial_step=step, main_process=ctx.is_main, jsonl=config.telemetry.jsonl,
                          tensorboard=config.telemetry.tensorboard, progress_bar=config.telemetry.progress_bar,
                          gpu_sample_interval_s=config.telemetry.gpu_sample_interval_s)
    if ctx.is_main:
        peak = telemetry.throughput.peak_tflops
        print(f"mrgfast.train: MFU against {telemetry.peak_source}: "
              f"{'unknown' if peak is None else f'{peak:.4g} TFLOP/s'}", file=sys.stderr)
    static_shape = static_shape_of(config, device, pieces.packed)
    runner = StepRunner(lambda micros: train_step(pieces.wrapped, pieces.optimizer, micros, settings, params,
                                                  static_grads=static_shape is not None),
                        device, enabled=config.cuda_graphs)
    g = config.guard
    guard = NonFiniteGuard(device, skip=g.on_nonfinite == "skip", max_consecutive_skips=g.max_consecutive_skips,
                           zero_grad_steps=g.zero_grad_steps, max_abs_weight=g.max_abs_weight)
    return RunState(config, ctx, out_dir, pieces, params, settings, runner, telemetry, guard, batches, step, consumed,
                    ckpt.path if ckpt else None, sharded, static_shape, ref_logps, ref_path,
                    checkpoint_files={RESOLVED_NAME: config_text(config)}, next_log={"data": data_stats})


def static_shape_of(config: TrainConfig, device: torch.device, packed: PackedBatchSampler):
    """The shape every batch of the run is padded to where a captured CUDA graph replays the step (cuda_graphs=true
    on CUDA; a StaticDPOShape for mode=dpo), else None."""
    if not (config.cuda_graphs and device.type == "cuda"):
        return None
    shape = StaticDPOShape if config.mode == "dpo" else StaticShape
    return shape.for_lengths(packed.lengths, packed.budget, packed.rows)


def decoder_flops_per_token(decoder: nn.Module) -> float:
    """The decoder's weight-matmul FLOPs per trained token (training_flops_per_token): every weight but the input
    embedding, a lookup (counted once, as the LM head, when tied). The vision encoder and the adapters run once per
    image, not per token, and are left out: MFU errs low for vision-heavy steps."""
    weights = sum(p.numel() for p in decoder.parameters())
    if not decoder.config.tie_word_embeddings:
        weights -= decoder.model.embed_tokens.weight.numel()
    trainable = sum(p.numel() for p in decoder.parameters() if p.requires_grad)
    return training_flops_per_token(weights, trainable)


def restore(core: nn.Module, optimizer, schedule, ckpt, rank: int, sharded: bool = False) -> None:
    """Put a checkpoint's weights, optimizer state, schedule position and this rank's RNG state back (`sharded`:
    into the FSDP2 shards of the trainables, a collective on every rank). The optimizer's hyperparameters and the
    schedule's settings stay the run's own (its config, compared with the checkpoint's by train.resume), so an
    allowed change of optim.lr or schedule.max_steps takes effect."""
    settings = hyperparameters(optimizer)
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
    keep_hyperparameters(optimizer, settings)
    schedule.continue_from(ckpt.scheduler)
    restore_rank_rng_state(ckpt.rng_states, rank, ckpt.path)


def reference_logps(pieces: Pieces, config: TrainConfig, ctx: DistContext, path: Path, autocast_dtype) -> dict:
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

"""Config -> everything train() runs: tokenizer, data, collator, packed sampler, model (wrapped), AdamW, schedule."""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from mrgfast.assemble.data import (ResumableBatchSampler, build_tokenizer, check_max_length, read_samples,
                                   sample_lengths, synthetic_root)
from mrgfast.assemble.model import TEMPLATES, build_model
from mrgfast.config import ConfigError, TrainConfig
from mrgfast.data import DPOCollator, MedicalDataset, PackedBatchSampler, PackingCollator, PromptBuilder
from mrgfast.training.optim import build_adamw
from mrgfast.training.schedule import WarmupSchedule


@dataclass
class Pieces:
    """Everything train() needs, built from the config."""

    tokenizer: object
    builder: PromptBuilder
    dataset: MedicalDataset
    collator: object
    packed: PackedBatchSampler
    model: nn.Module                  # the MultimodalLM itself (FSDP2 shards it in place)
    wrapped: nn.Module                # what the step calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    schedule: WarmupSchedule


def build_all(config: TrainConfig, device: torch.device, wrap: Optional[Callable] = None,
              init_weights: bool = True) -> Pieces:
    """Tokenizer, data, model (on `device`, then `wrap`ped for data parallelism), AdamW and schedule for `config`;
    `init_weights=False` (a resumed run) leaves model.init_from unread.

    The optimizer is built after wrapping: FSDP2 replaces the parameters with sharded ones.
    """
    if config.mode == "dpo" and config.dpo.reference == "disabled_adapters" and not config.lora.enabled:
        raise ConfigError("dpo.reference: 'disabled_adapters' needs lora.enabled=true (the reference is the model "
                          "with its adapters off); use dpo.reference=precomputed")
    root = synthetic_root(config) if config.data.dataset == "synthetic" else None
    tokenizer = build_tokenizer(config, root)
    samples = read_samples(config, root)
    if not samples:
        raise ConfigError(f"data: no samples read from {config.data.path or root} (split {config.data.split!r})")
    views = len(samples[0].image_paths)
    parts = build_model(config, tokenizer.vocab_size, views, device, init_weights=init_weights)
    model = parts.model.to(device)
    builder = PromptBuilder(tokenizer, TEMPLATES[config.model.recipe], **parts.builder_kwargs)
    dataset = MedicalDataset(samples, image_config=parts.image_config, volume_config=parts.volume_config,
                             skip_bad_samples=config.data.skip_bad_samples, seed=config.seed)
    dpo = config.mode == "dpo"
    budget, rows = config.data.token_budget, config.data.rows
    measured = [sample_lengths(builder, s, dpo, config.dpo.layout) for s in samples]
    check_max_length(samples, [longest for _, longest in measured], config.data.max_length)
    lengths = [min(packed_length, budget) for packed_length, _ in measured]
    if dpo:
        collator = DPOCollator(budget, rows, layout=config.dpo.layout, builder=builder)
    else:
        collator = PackingCollator(budget, rows, builder=builder)
    packed = PackedBatchSampler(lengths, budget, rows, seed=config.seed, shuffle=config.data.shuffle)
    wrapped = wrap(model) if wrap is not None else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("the model has no trainable parameters: enable lora or an adapter")
    o = config.optim
    optimizer = build_adamw(trainable, o.lr, device, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                            fused=o.fused)
    s = config.schedule
    schedule = WarmupSchedule(optimizer, s.max_steps, s.resolved_warmup_steps(), s.name, s.num_cycles, s.min_lr_rate)
    return Pieces(tokenizer, builder, dataset, collator, packed, model, wrapped, optimizer, schedule)


def build_loader(pieces: Pieces, config: TrainConfig, rank: int, world_size: int, consumed: int):
    """A DataLoader over this rank's micro-batches, starting after `consumed` global micro-batches."""
    sampler = ResumableBatchSampler(pieces.packed, rank, world_size, consumed)
    return torch.utils.data.DataLoader(pieces.dataset, batch_sampler=sampler, collate_fn=pieces.collator,
                                       num_workers=config.data.num_workers)

"""RAD3D-Prefix's classify stage (mode=classify): the 18-label diagnostic head on the frozen volume encoder's pooled
features, trained with BCE and scored on the validation split (per-label AUROC and F1, macro averages).

The encoder is frozen, so every volume's pooled feature is computed once; the linear head then trains full-batch
for schedule.max_steps AdamW steps (optim.*, the schedule's warmup and decay) on the features standardized with the
training volumes' statistics, folded into the saved weights (a plain linear head on the encoder's features). It
writes into output_dir:
classifier.safetensors + classifier.json (what model.classifier_from loads), eval-step-XXXXXX.json (every metric),
eval.jsonl (the macro figures), metrics.jsonl (loss and LR) and config.yaml.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrgfast.assemble.classify import ClassifyInputs, classify_inputs
from mrgfast.common.rng import seed_everything
from mrgfast.config import ConfigError, TrainConfig, save_resolved
from mrgfast.data.dataset import MedicalDataset
from mrgfast.metrics import multilabel_metrics, write_eval_json
from mrgfast.models.classifier_io import module_digest, save_classifier
from mrgfast.training.distributed import DistContext
from mrgfast.training.guards import NonFiniteError
from mrgfast.training.metrics_log import JsonlLogger
from mrgfast.training.optim import build_adamw
from mrgfast.training.schedule import WarmupSchedule
from mrgfast.training.steps import autocast

EVAL_LOG = "eval.jsonl"
METRICS_LOG = "metrics.jsonl"


@dataclass
class ClassifierRun:
    """What the classify stage leaves: where, the trained head, its step count, the logged records, the validation
    record."""

    output_dir: Path
    head: nn.Linear
    step: int
    history: list = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)


def pooled_features(encoder: nn.Module, samples: list, volume_config, device: torch.device, batch_size: int,
                    autocast_dtype: Optional[torch.dtype], skip_bad_samples: bool = False) -> tuple:
    """(pooled features [N, dim] fp32 on `device`, the samples they belong to): the frozen encoder's embedding of
    each volume, loaded and preprocessed as the prefix run loads it."""
    dataset = MedicalDataset(samples, volume_config=volume_config, skip_bad_samples=skip_bad_samples)
    if skip_bad_samples:
        dataset = dataset.check()
    features = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            volumes = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(start + batch_size,
                                                                                         len(dataset)))])
            with autocast(device, autocast_dtype):
                features.append(encoder(volumes.to(device)).pooled.float())
    return torch.cat(features), list(dataset.samples)


def label_matrix(samples: list, labels: list, device: torch.device) -> Tensor:
    """[N, L] targets in {1, 0, -1} (-1: uncertain, left out of the loss and the metrics)."""
    return torch.tensor([[sample.labels[name] for name in labels] for sample in samples], dtype=torch.float32,
                        device=device)


def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """BCEWithLogits averaged over the known (not -1) targets."""
    known = targets != -1
    losses = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0.0), reduction="none")
    return (losses * known).sum() / known.sum().clamp(min=1)


def standardizer(x: Tensor) -> tuple:
    """(mean, std) per feature over the training volumes (std floored): a frozen random encoder's pooled features
    differ between volumes by a few hundredths around means near 1, which leaves AdamW crawling on raw inputs."""
    return x.mean(0), x.std(0).clamp(min=1e-6)


def fold_standardizer(head: nn.Linear, mean: Tensor, std: Tensor) -> nn.Linear:
    """The linear head on raw features equal to `head` on standardized ones: W' = W / std, b' = b - W' mean."""
    folded = torch.nn.utils.skip_init(nn.Linear, head.in_features, head.out_features, device=head.weight.device,
                                      dtype=head.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_(head.bias - folded.weight @ mean)
    return folded.eval().requires_grad_(False)


def train_head(config: TrainConfig, x: Tensor, y: Tensor, device: torch.device,
               log: Callable[[int, dict], dict]) -> nn.Linear:
    """A linear head [dim -> L] on raw features, trained full-batch with BCE, AdamW and the configured schedule on
    standardized features and folded back (fold_standardizer)."""
    o, s = config.optim, config.schedule
    mean, std = standardizer(x)
    x = (x - mean) / std
    head = nn.Linear(x.shape[1], y.shape[1]).to(device)
    optimizer = build_adamw(list(head.parameters()), o.lr, device, betas=o.betas, eps=o.eps,
                            weight_decay=o.weight_decay, fused=o.fused)
    schedule = WarmupSchedule(optimizer, s.max_steps, s.resolved_warmup_steps(), s.name, s.num_cycles, s.min_lr_rate)
    for step in range(1, s.max_steps + 1):
        lr = schedule.get_last_lr()[0]
        loss = bce_loss(head(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = (torch.nn.utils.clip_grad_norm_(head.parameters(), o.max_grad_norm) if o.max_grad_norm is not None
                else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in head.parameters()])))
        if not torch.isfinite(loss):
            raise NonFiniteError(f"mode=classify: the BCE loss is {float(loss)} at step {step}; nothing is saved")
        optimizer.step()
        schedule.step()
        if step % config.telemetry.log_every == 0 or step == s.max_steps:
            log(step, {"loss": float(loss.detach()), "grad_norm": float(norm), "lr": float(lr)})
    return fold_standardizer(head, mean, std)


def train_classifier(config: TrainConfig, ctx: DistContext,
                     on_step: Optional[Callable[[int, dict], None]] = None) -> ClassifierRun:
    """Run the classify stage of `config` (inside train(), which holds the output_dir's lock)."""
    if ctx.world_size > 1:
        raise ConfigError(f"mode=classify runs in one process (its features are computed once, its head trains "
                          f"full-batch), got {ctx.world_size} under torchrun")
    out_dir, device = Path(config.output_dir), ctx.device
    save_resolved(config, out_dir)
    seed_everything(config.seed)
    inputs: ClassifyInputs = classify_inputs(config)
    digest = module_digest(inputs.encoder)  # on the CPU, as the prefix run checks it: before any move or cast
    encoder = inputs.encoder.to(device)
    bf16 = device.type == "cuda" and config.model.dtype in ("auto", "bfloat16")
    dtype = torch.bfloat16 if bf16 else None
    c, skip = config.classify, config.data.skip_bad_samples
    x_train, train = pooled_features(encoder, inputs.train, inputs.volume_config, device, c.batch_size, dtype, skip)
    x_val, val = pooled_features(encoder, inputs.val, inputs.volume_config, device, c.batch_size, dtype, skip)
    y_train, y_val = label_matrix(train, inputs.labels, device), label_matrix(val, inputs.labels, device)
    print(f"mrgfast.train: classify: {len(train)} train and {len(val)} val volumes ({inputs.val_source}), "
          f"{len(inputs.labels)} labels, features {inputs.dim}", file=sys.stderr)

    history = []
    metrics_log = JsonlLogger(out_dir / METRICS_LOG, resume_step=0)  # a rerun replaces the previous run's lines
    try:
        def log(step: int, record: dict) -> dict:
            history.append(metrics_log.log(step, record))
            if on_step is not None:
                on_step(step, record)
            return history[-1]
        head = train_head(config, x_train, y_train, device, log)
    finally:
        metrics_log.close()

    step = config.schedule.max_steps
    with torch.no_grad():
        logits = head(x_val)
    scores = multilabel_metrics(logits.cpu().numpy(), y_val.cpu().numpy().astype(int), inputs.labels, c.threshold)
    write_eval_json(out_dir / f"eval-step-{step:06d}.json",
                    {"classifier": scores, "split": inputs.val_source, "n_samples": len(val)})
    record = {"classifier/macro_auroc": scores["macro_auroc"], "classifier/macro_f1": scores["macro_f1"]}
    eval_log = JsonlLogger(out_dir / EVAL_LOG, resume_step=0)
    try:
        eval_log.log(step, {k: v for k, v in record.items() if v is not None})
    finally:
        eval_log.close()
    save_classifier(head, out_dir, inputs.labels, digest,
                    encoder={"kind": type(inputs.encoder).__name__, "dim": inputs.dim,
                             "volume_shape": list(inputs.volume_config.shape or [])},
                    val={"macro_auroc": scores["macro_auroc"], "macro_f1": scores["macro_f1"],
                         "threshold": c.threshold, "n": len(val), "source": inputs.val_source},
                    steps=step, seed=config.seed)
    figures = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if v is not None)
    print(f"mrgfast.train: classify: val {figures or 'no label with both classes'} "
          f"({len(scores['single_class'])} single-class labels left out); wrote {out_dir}", file=sys.stderr)
    return ClassifierRun(out_dir, head, step, history, {"step": step, **record})

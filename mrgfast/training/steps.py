"""The training step: forward, fused loss normalised over the whole accumulated batch, backward, clip, AdamW.

Everything here is free of host synchronisation (the loop prepares batches and normalisers on the host first),
so `train_step` can be captured in a CUDA graph; a CPU test runs it under mrgfast.testing.sync_guard.no_host_sync.
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mrgfast.common.files import atomic_write
from mrgfast.data.packing import IGNORE_INDEX, PackedBatch
from mrgfast.data.static_batch import StaticShape, make_static
from mrgfast.data.static_dpo import StaticDPOShape, make_static_dpo
from mrgfast.layout import AttentionLayout, OutputRows, Segments
from mrgfast.losses.dpo_inputs import dpo_loss_inputs, dpo_sequence_logps
from mrgfast.losses.fused_dpo import fused_dpo_loss
from mrgfast.models.feature_cache import tensor_digest
from mrgfast.ops.linear_cross_entropy import linear_cross_entropy
from mrgfast.peft import disable_adapters
from mrgfast.peft.state import get_lora_state
from mrgfast.training.distributed import gradient_sync
from mrgfast.training.fsdp import average_gradients
from mrgfast.training.optim import step_unless

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


@dataclass
class MicroBatch:
    """One micro-batch on the device with what the step needs besides it: its share of the global normaliser
    (`weight`), the token count (SFT) and the precomputed reference log-probs (DPO, or None)."""

    batch: PackedBatch
    num_items: Tensor                 # SFT: supervised tokens of the whole global batch (all micro-batches, ranks)
    weight: Tensor                    # DPO: pairs here / pairs in the global batch
    ref_logps: Optional[Tensor] = None  # [2P], or [2 x pair slots] for a static batch (padded_pair_values)


@dataclass
class StepSettings:
    """Static settings of the step."""

    mode: str = "sft"
    world_size: int = 1
    max_grad_norm: Optional[float] = 1.0
    beta: float = 0.1
    loss_type: Union[str, Sequence[str]] = "sigmoid"
    label_smoothing: float = 0.0
    autocast_dtype: Optional[torch.dtype] = None
    average_gradients: bool = False   # FSDP2 here keeps trainables unsharded: their gradients are averaged by hand
    loss_weights: Optional[Sequence[float]] = None


def full_tensor(value: Tensor) -> Tensor:
    """A replicated DTensor (FSDP2's gradient norm) as the plain tensor it holds on every rank; others as they are."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 modules are their own model)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def head(model: nn.Module) -> tuple:
    """(weight, bias) of the decoder's LM head."""
    lm_head = unwrap(model).decoder.lm_head
    return lm_head.weight, lm_head.bias


def supervised_tokens(batch: PackedBatch) -> int:
    """Supervised (labelled) tokens of a host-side batch."""
    return int((batch.labels != IGNORE_INDEX).sum())


def pair_count(batch: PackedBatch) -> int:
    """Preference pairs of a host-side DPO batch."""
    return (batch.dpo_cu_seqlens.numel() - 1) // 2


def prepare(batch: PackedBatch, device: torch.device,
            static_shape: Union[StaticShape, StaticDPOShape, None] = None, digest_images: bool = False) -> PackedBatch:
    """The batch on `device` with its attention layout built on the host first (the decoder would otherwise
    read cu_seqlens back from the device inside the step).

    With `static_shape` (CUDA graphs replay fixed shapes) the batch becomes a static one (make_static: fixed
    [rows, budget], padded documents, samples and slot indices, no host values the step reads; make_static_dpo for
    a StaticDPOShape: also padded key gathers, answer tokens and pair slots). Without it, two
    savings that change shapes from batch to batch: the padding past the widest row's last sample is cut off
    (PackedBatch.trimmed), and an SFT batch gets `loss_rows`, each document's rows from its first supervised
    position on: most positions of a multimodal batch are visual or prompt tokens without a label, and neither
    the LM head (the largest GEMM of a small model's step) nor the last block's queries and MLP need run there.
    `digest_images` hashes each sample's pixel_values here, on the host, for a model with a feature cache
    (hashing inside the step would copy the images back from the GPU)."""
    if digest_images and isinstance(batch.pixel_values, Tensor) and batch.image_digests is None:
        batch.image_digests = [tensor_digest(sample) for sample in batch.pixel_values]
    if static_shape is not None:
        static = make_static_dpo if isinstance(static_shape, StaticDPOShape) else make_static
        return static(batch, static_shape).to(device)
    batch = batch.trimmed()
    if batch.layout is None:
        total = batch.input_ids.numel()
        batch.layout = AttentionLayout.causal(Segments.from_cu_seqlens(batch.cu_seqlens, total, "cpu"))
    if batch.loss_rows is None and batch.dpo_index is None:
        batch.loss_rows = supervised_suffixes(batch.labels.reshape(-1), batch.layout.seg_q)
    return batch.to(device)


def supervised_suffixes(labels: Tensor, seg: Segments) -> OutputRows:
    """OutputRows from each document's first supervised (labelled) position to its end (none: empty)."""
    supervised = (labels != IGNORE_INDEX).tolist()
    starts = []
    for start, end in zip(seg.bounds, seg.bounds[1:]):
        starts.append(next((i for i in range(start, end) if supervised[i]), end))
    return OutputRows.suffixes(seg, starts, "cpu")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """bf16 autocast on CUDA when asked; a no-op context otherwise (fp32 on CPU)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def sft_loss(model: nn.Module, micro: MicroBatch) -> Tensor:
    """Summed token cross-entropy of the micro-batch divided by the global batch's token count (fused head)."""
    hidden = model(micro.batch)  # [loss rows, hidden] when the batch has loss_rows, else [rows, seq, hidden]
    weight, bias = head(model)
    flat = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
    labels = micro.batch.labels.reshape(-1)
    if micro.batch.loss_rows is not None:
        labels = labels.index_select(0, micro.batch.loss_rows.index)
    return linear_cross_entropy(flat, weight, labels, bias, num_items_in_batch=micro.num_items)


def dpo_loss(model: nn.Module, micro: MicroBatch, settings: StepSettings) -> tuple:
    """(DPO loss weighted by this micro-batch's share of the global pairs, metrics) from the fused head; the
    reference is precomputed or the same model with its adapters disabled (the same Python calls every step, so a
    captured graph holds both passes). A static batch's padded pair slots count in neither loss nor metrics."""
    hidden = model(micro.batch)
    weight, bias = head(model)
    ref_hidden = None
    if micro.ref_logps is None:
        core = unwrap(model)
        with torch.no_grad(), disable_adapters(core.decoder):
            ref_hidden = core(micro.batch)
    hidden = hidden.to(weight.dtype)
    inputs = dpo_loss_inputs(hidden, *micro.batch.dpo_targets(hidden),
                             ref_hidden=None if ref_hidden is None else ref_hidden.to(weight.dtype))
    loss, metrics = fused_dpo_loss(**inputs, weight=weight, bias=bias, ref_logps=micro.ref_logps,
                                   beta=settings.beta, loss_type=settings.loss_type,
                                   label_smoothing=settings.label_smoothing, loss_weights=settings.loss_weights,
                                   pair_mask=micro.batch.dpo_pair_mask)
    return loss * micro.weight, {k: metrics[k].detach() * micro.weight for k in DPO_METRICS}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micros: Sequence[MicroBatch],
               settings: StepSettings, params: Sequence[Tensor], static_grads: bool = False) -> dict:
    """One optimizer step over the accumulated micro-batches; returns device tensors (loss, grad_norm, DPO metrics).
    A step whose loss or gradient norm is not finite leaves the weights and the optimizer state as they were.

    Each micro-batch's loss is already divided by the global batch's normaliser, so the summed gradients equal
    one big batch's; under DDP the gradients are averaged over ranks, hence the world_size factor.
    """
    device = params[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    sums: dict = {}
    last = len(micros) - 1
    for i, micro in enumerate(micros):
        with gradient_sync(model, enabled=i == last), autocast(device, settings.autocast_dtype):
            if settings.mode == "sft":
                loss, metrics = sft_loss(model, micro), {}
            else:
                loss, metrics = dpo_loss(model, micro, settings)
            (loss * settings.world_size).backward()
        total = total + loss.detach().float()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0) + value.float()
    out = {"loss": total, **sums}
    if settings.average_gradients:
        average_gradients(params, settings.world_size)
    if settings.max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    out["grad_norm"] = norm = full_tensor(norm)
    # A NaN/inf loss or gradient never reaches the weights: the update is skipped on the device (the guard reports
    # it where the loop reads values anyway).
    step_unless(optimizer, (~torch.isfinite(norm) | ~torch.isfinite(total)).float())
    # Kept allocated (zeros) for a captured graph, whose gradient buffers must stay put; freed otherwise.
    optimizer.zero_grad(set_to_none=not static_grads)
    return out


# ------------------------------------------------------------------------------ precomputed DPO reference

def reference_context(model: nn.Module):
    """The reference model: adapters disabled when the decoder has LoRA, else the model as it is now."""
    if get_lora_state(model.decoder) is not None:
        return disable_adapters(model.decoder)
    return contextlib.nullcontext()


@torch.no_grad()
def precompute_reference_logps(model: nn.Module, batches, device: torch.device,
                               autocast_dtype: Optional[torch.dtype] = None) -> dict:
    """{sample id: [chosen, rejected] summed reference log-probs} over DPO batches (a first pass, eval mode)."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        with reference_context(model):
            for batch in batches:
                batch = prepare(batch, device)
                with autocast(device, autocast_dtype):
                    hidden = model(batch)
                weight, bias = model.decoder.lm_head.weight, model.decoder.lm_head.bias
                hidden = hidden.to(weight.dtype)
                chosen, rejected = dpo_sequence_logps(hidden, *batch.dpo_targets(hidden), weight, bias)
                ids = batch.sample_ids[:chosen.shape[0]]  # padded layout lists each pair's id twice
                for sample_id, c, r in zip(ids, chosen.cpu(), rejected.cpu()):
                    out[str(sample_id)] = torch.stack([c, r]).float()
    finally:
        model.train(was_training)
    return out


def save_reference_logps(logps: dict, path: Path) -> None:
    """Write reference log-probs keyed by sample id as safetensors (atomically)."""
    with atomic_write(path) as temp:
        save_file({k: v.contiguous() for k, v in logps.items()}, str(temp), metadata={"format": "pt"})


def load_reference_logps(path: Path) -> dict:
    """Reference log-probs written by save_reference_logps."""
    return load_file(str(path), device="cpu")


def batch_reference_logps(logps: dict, batch: PackedBatch, source: Path) -> Tensor:
    """[2P] reference log-probs (chosen then rejected) for a host-side DPO batch; ValueError naming a missing id."""
    pairs = pair_count(batch)
    ids = [str(i) for i in batch.sample_ids[:pairs]]
    missing = [i for i in ids if i not in logps]
    if missing:
        raise ValueError(f"{source}: no reference log-probs for sample id {missing[0]!r}; delete the file to "
                         "recompute them for this dataset")
    both = torch.stack([logps[i] for i in ids])
    return torch.cat([both[:, 0], both[:, 1]])

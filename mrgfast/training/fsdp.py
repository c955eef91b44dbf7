"""FSDP2 for PEFT: shard the frozen base (that is where the memory is); shard the trainable set too on request.

Default (`distributed.shard_trainable: false`): the trainable weights (LoRA, projector, prompts, prefix) are left
out of sharding (`ignored_params`), so they stay plain tensors on every rank: the optimizer, clipping,
checkpoints and exact resume work on them exactly as in one process, and their gradients are averaged over ranks
by `average_gradients` (one all-reduce per tensor, after the last accumulation micro-step), as DDP would.

`distributed.shard_trainable: true` (large trainable sets: RAD3D-Prefix's mapper, full fine-tuning): every
parameter becomes a DTensor sharded over the ranks, and so does its AdamW state. FSDP2 reduce-scatters (and
averages) the gradients itself, so nothing is averaged by hand, and `clip_grad_norm_` on the DTensor gradients
gives the global norm. Checkpoints keep the one-process format: `gather_full_state` collects full CPU copies of
the trainable weights and the optimizer state on rank 0 (a collective: every rank calls it), and
`scatter_full_state` puts a full state read from a checkpoint back into every rank's shards.
"""

from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mrgfast.models.multimodal import check_named_shapes
from mrgfast.peft.adapter_io import (adapter_state_dict, check_same_lora, checked_adapter_tensors,
                                     read_adapter_weights)
from mrgfast.peft.config import CONFIG_NAME, LoraConfig
from mrgfast.peft.state import require_lora_state
from mrgfast.training.checkpoint import load_optimizer_state
from mrgfast.training.distributed import DistContext


def shard_model(model: nn.Module, ctx: DistContext, shard_trainable: bool = False) -> nn.Module:
    """fully_shard each decoder layer and then the whole model; returns `model`.

    Trainable parameters are excluded (kept whole on every rank) unless `shard_trainable`.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    ignored = None if shard_trainable else {p for p in model.parameters() if p.requires_grad}
    for block in model.decoder.model.layers:
        # The fused q/k/v op re-points the base weights into one buffer; FSDP2 swaps them between shards and
        # gathered copies around every forward, so sharded layers keep three separate projections.
        block.self_attn.fuse_qkv = False
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model


def average_gradients(params: Sequence[Tensor], world_size: int) -> None:
    """Average the gradients of replicated (unsharded) parameters over all ranks, in place."""
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(world_size)


# ------------------------------------------------------------------------- checkpoints of sharded trainables

@dataclass
class FullState:
    """The whole (unsharded) trainable state of a sharded model, on the CPU."""

    weights: dict[str, Tensor]        # every trainable parameter, by its name in the model
    optimizer: dict                   # as Optimizer.state_dict() gives it: parameters numbered in param_groups order


def tensor_names(model: nn.Module) -> dict[int, str]:
    """{id(tensor): its name in `model`} for every parameter and buffer (the names state_dict uses)."""
    return {id(t): name for name, t in chain(model.named_parameters(), model.named_buffers())}


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require grad, in model order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def shard_bounds(size: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, row count) of `rank`'s shard of a dimension of `size` split FSDP2's way (torch.chunk:
    ceil(size / world) rows a rank, so the last ranks' shards are short or empty)."""
    per = -(-size // world)
    start = min(rank * per, size)
    return start, min(per, size - start)


def shard_layout(tensor) -> tuple[Optional[int], Optional[dist.ProcessGroup]]:
    """(the dimension a DTensor is split on, or None when replicated; its mesh's process group); ValueError for
    a layout FSDP2 does not give (more than one mesh dimension, partial sums)."""
    from torch.distributed.tensor import Replicate, Shard
    if tensor.device_mesh.ndim != 1 or len(tensor.placements) != 1:
        raise ValueError(f"sharded checkpoints support 1-D meshes (FSDP2), got placements {tensor.placements}")
    placement = tensor.placements[0]
    if isinstance(placement, Replicate):
        return None, tensor.device_mesh.get_group()
    if not isinstance(placement, Shard):
        raise ValueError(f"sharded checkpoints support Shard or Replicate placements, got {placement}")
    return placement.dim, tensor.device_mesh.get_group()


def full_copy(value):
    """A whole CPU copy of a tensor; a DTensor is gathered with one blocking all_gather (a collective: every rank
    calls it for the same tensors in the same order). Other values come back unchanged."""
    from torch.distributed.tensor import DTensor
    if not isinstance(value, Tensor):
        return value
    if not isinstance(value, DTensor):
        return value.detach().cpu().clone()
    dim, group = shard_layout(value)
    local = value.to_local().detach()
    if dim is None:
        return local.cpu().clone()
    world, rank, size = dist.get_world_size(group), dist.get_rank(group), value.shape[dim]
    _, rows = shard_bounds(size, world, rank)
    if local.shape[dim] != rows:
        raise ValueError(f"rank {rank} holds {local.shape[dim]} rows of dimension {dim} (size {size}), "
                         f"expected {rows} for an even torch.chunk split over {world} ranks")
    # Equal-sized pieces for the collective: each shard padded to the first rank's row count.
    shape = list(local.shape)
    shape[dim] = shard_bounds(size, world, 0)[1]
    padded = local.new_zeros(shape)
    padded.narrow(dim, 0, rows).copy_(local)
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat(pieces, dim).narrow(dim, 0, size).cpu().clone()


def local_shard(full: Tensor, like) -> Tensor:
    """This rank's shard of the whole tensor `full`, laid out as the DTensor `like` holds its own (no collective:
    every rank has `full`)."""
    dim, group = shard_layout(like)
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"a tensor of shape {tuple(full.shape)} where the model's is {tuple(like.shape)}")
    device, dtype = like.to_local().device, like.dtype
    if dim is None:
        return full.to(device=device, dtype=dtype).clone()
    start, rows = shard_bounds(full.shape[dim], dist.get_world_size(group), dist.get_rank(group))
    return full.narrow(dim, start, rows).to(device=device, dtype=dtype).clone()


def gather_full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Optional[FullState]:
    """Full CPU copies of the trainable weights and the optimizer state of a sharded model, on rank 0 (None on
    the other ranks). A collective: every rank must call it, at the same point.

    Plain blocking all_gathers, not DTensor redistribution (torch.distributed.checkpoint's get_*_state_dict):
    on gloo, a local run through that path aborted with heap corruption inside its asynchronous collectives
    (`wait_tensor`); the cause inside torch was not found.
    """
    weights = {name: full_copy(p) for name, p in model.named_parameters() if p.requires_grad}
    own = optimizer.state_dict()  # numbered in param_groups order, as one process saves it
    state = {index: {key: full_copy(value) for key, value in per_param.items()}
             for index, per_param in own["state"].items()}
    if dist.get_rank() != 0:
        return None
    return FullState(weights, {"state": state, "param_groups": own["param_groups"]})


def scatter_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Tensor],
                       optimizer_state: dict, source) -> None:
    """Copy a full trainable state (as gather_full_state gives it, or as one process saves it) into a sharded
    model's and optimizer's shards. Every rank read the whole state from the checkpoint, so each cuts out its
    own shard: no communication."""
    from torch.distributed.tensor import DTensor
    check_full_weights(model, weights, source)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            param = params[name]
            if isinstance(param, DTensor):
                param.to_local().copy_(local_shard(value, param))  # under no_grad: FSDP2's shard storage itself
            else:
                param.copy_(value)
    load_optimizer_state(optimizer, optimizer_state, source,
                         load=lambda numbered: optimizer.load_state_dict(sharded_optimizer_state(optimizer, numbered)))


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, numbered: dict) -> dict:
    """A one-process Optimizer.state_dict() with each parameter-shaped state tensor (AdamW's moments) turned into
    a DTensor sharded like its parameter; ValueError naming the entry when it does not fit."""
    from torch.distributed.tensor import DTensor
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, per_param in numbered.get("state", {}).items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise ValueError(f"state for parameter {index!r}; the optimizer has {len(params)} parameters")
        param, state[index] = params[index], {}
        for key, value in per_param.items():
            if isinstance(param, DTensor) and isinstance(value, Tensor) and value.dim() > 0:
                try:
                    shard = local_shard(value, param)
                except ValueError as err:
                    raise ValueError(f"state {index}.{key}: {err}") from None
                value = DTensor.from_local(shard, param.device_mesh, param.placements, run_check=False,
                                           shape=param.shape, stride=param.stride())
            state[index][key] = value
    return {**numbered, "state": state}


def check_full_weights(model: nn.Module, weights: dict[str, Tensor], source) -> None:
    """ValueError naming `source` unless `weights` holds exactly the trainable parameters, each at full shape."""
    check_named_shapes(weights, dict(model.named_parameters()), trainable_names(model), source)


def adapter_names(model: nn.Module, decoder: nn.Module) -> dict[str, str]:
    """{PEFT adapter key: the tensor's name in `model`} for the LoRA adapter of `decoder`, a submodule of `model`."""
    names = tensor_names(model)
    return {key: names[id(t)] for key, t in adapter_state_dict(decoder).items()}


def adapter_tensors(model: nn.Module, decoder: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The PEFT adapter of `decoder` (keys as save_adapter writes them) taken from full `weights` named as in
    `model`; ValueError when one of its tensors is not among them (e.g. a frozen tensor in modules_to_save)."""
    names = adapter_names(model, decoder)
    absent = sorted(name for name in names.values() if name not in weights)
    if absent:
        raise ValueError(f"adapter tensor {absent[0]!r} is not a trainable parameter; with "
                         "distributed.shard_trainable=true every adapter tensor must be trainable")
    return {key: weights[name] for key, name in names.items()}


def read_adapter_by_name(model: nn.Module, decoder: nn.Module, directory: Path) -> dict[str, Tensor]:
    """A PEFT adapter directory's tensors, checked against `decoder`'s adapter and named as in `model`."""
    check_same_lora(require_lora_state(decoder, "load_adapter").config, LoraConfig.from_pretrained(directory),
                    directory / CONFIG_NAME)
    file, tensors = read_adapter_weights(directory)
    checked = checked_adapter_tensors(decoder, tensors, file)
    return {name: checked[key] for key, name in adapter_names(model, decoder).items()}

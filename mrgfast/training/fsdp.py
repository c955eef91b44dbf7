"""FSDP2 for PEFT: shard the frozen base (that is where the memory is), keep the small trainable set whole.

The trainable weights (LoRA, projector, prompts, prefix) are left out of sharding (`ignored_params`), so they
stay plain tensors on every rank: the optimizer, clipping, checkpoints and exact resume work on them exactly as
in one process, and their gradients are averaged over ranks by `average_gradients` (one all-reduce per tensor,
after the last accumulation micro-step), as DDP would.
"""

from typing import Sequence

import torch.distributed as dist
from torch import Tensor, nn

from mrgfast.training.distributed import DistContext


def shard_frozen(model: nn.Module, ctx: DistContext) -> nn.Module:
    """fully_shard each decoder layer and then the whole model, trainable parameters excluded; returns `model`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    trainable = {p for p in model.parameters() if p.requires_grad}
    for block in model.decoder.model.layers:
        fully_shard(block, mesh=mesh, ignored_params=trainable)
    fully_shard(model, mesh=mesh, ignored_params=trainable)
    return model


def average_gradients(params: Sequence[Tensor], world_size: int) -> None:
    """Average the gradients of replicated (unsharded) parameters over all ranks, in place."""
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(world_size)

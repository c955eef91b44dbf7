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


def full_options(**extra):
    """StateDictOptions for whole tensors (torch.distributed.checkpoint.state_dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **extra)


def tensor_names(model: nn.Module) -> dict[int, str]:
    """{id(tensor): its name in `model`} for every parameter and buffer (the names state_dict uses)."""
    return {id(t): name for name, t in chain(model.named_parameters(), model.named_buffers())}


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The names of each param group's parameters, in the optimizer's order (the order its state_dict numbers)."""
    names = tensor_names(model)
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not in the model") from None


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require grad, in model order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def gather_full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Optional[FullState]:
    """Full CPU copies of the trainable weights and the optimizer state of a sharded model, on rank 0 (None on
    the other ranks). A collective: every rank must call it, at the same point."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    # cpu_offload gathers onto rank 0 only; frozen weights (the sharded base) are neither gathered nor saved.
    options = full_options(cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_named = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return None
    order = optimizer_param_names(model, optimizer)
    return FullState({name: weights[name] for name in trainable_names(model)}, numbered_state(optimizer_named, order))


def numbered_state(named: dict, order: list[list[str]]) -> dict:
    """A name-keyed optimizer state (torch.distributed.checkpoint's) in Optimizer.state_dict()'s own format:
    parameters numbered 0, 1, ... across the param groups in order, state sorted by that number."""
    index = {name: i for i, name in enumerate(chain.from_iterable(order))}
    state = {index[name]: value for name, value in named["state"].items()}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in named["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def named_state(numbered: dict, order: list[list[str]]) -> dict:
    """The inverse of numbered_state; ValueError when the saved groups do not fit the optimizer's."""
    groups = numbered.get("param_groups", [])
    sizes, expected = [len(g["params"]) for g in groups], [len(names) for names in order]
    if sizes != expected:
        raise ValueError(f"param group sizes {sizes}, the optimizer's {expected}")
    name = {}
    for group, names in zip(groups, order):
        name.update(zip(group["params"], names))
    unknown = sorted(set(numbered["state"]) - set(name))
    if unknown:
        raise ValueError(f"state for parameter {unknown[0]!r}, which no param group holds")
    return {"state": {name[i]: value for i, value in numbered["state"].items()},
            "param_groups": [{**g, "params": names} for g, names in zip(groups, order)]}


def scatter_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Tensor],
                       optimizer_state: dict, source) -> None:
    """Copy a full trainable state (as gather_full_state gives it, or as one process saves it) into a sharded
    model's and optimizer's shards. A collective: every rank calls it with the same full state."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    check_full_weights(model, weights, source)
    # Every rank holds the whole state (each read the checkpoint), so each keeps its own slice: no broadcast.
    set_model_state_dict(model, weights, options=full_options(strict=False))
    order = optimizer_param_names(model, optimizer)
    load_optimizer_state(optimizer, optimizer_state, source, load=lambda numbered: set_optimizer_state_dict(
        model, optimizer, named_state(numbered, order), options=full_options()))


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

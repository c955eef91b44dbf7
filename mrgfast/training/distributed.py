"""Process groups under torchrun (NCCL on CUDA, gloo on CPU), DDP / FSDP2 wrapping and metric reduction.

Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) everything here is a single-process no-op.
"""

import contextlib
import datetime
import importlib
import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

STRATEGIES = ("ddp", "fsdp")
BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class DistContext:
    """Where this process sits: rank, local rank, world size, its device, and whether it made the group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that logs and writes checkpoints)."""
        return self.rank == 0


def env_int(name: str, default: Optional[int] = None) -> Optional[int]:
    """An integer environment variable; ValueError naming it when it is not an integer."""
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r}: expected an integer (torchrun sets it)") from None


def pick_device(preference: str, local_rank: int) -> torch.device:
    """The device for this process: 'auto' -> cuda:<local_rank> when available, else cpu."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available; use device=cpu or device=auto")
    if preference != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Join the torchrun process group from RANK / WORLD_SIZE / LOCAL_RANK (single process when absent)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    world_size = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, LOCAL_RANK={local_rank}, "
                         f"WORLD_SIZE={world_size}")
    torch_device = pick_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size == 1 and not dist.is_initialized():
        return DistContext(device=torch_device)
    if backend == "auto":
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if backend == "nccl" and torch_device.type != "cuda":
        raise ValueError("backend='nccl' needs CUDA devices; use backend=gloo (or auto) on CPU")
    owns = False
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun")
        # Importing torch._dynamo while a group exists (DDP's constructor does) keeps that group alive past
        # destroy_process_group in torch 2.13, so its gloo threads outlive teardown (see drop_dtensor_caches for why
        # that matters). Imported before the group exists, it holds nothing.
        importlib.import_module("torch._dynamo")
        with stop_signals_blocked():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=torch_device if torch_device.type == "cuda" else None)
        owns = True
    return DistContext(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                       device=torch_device, backend=dist.get_backend(), owns_group=owns)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGTERM and SIGINT in the calling thread while it starts the process group's threads: they inherit
    the mask, so a SIGTERM sent to the process (a preempted job) reaches the main thread, where the training loop
    turns it into a clean stop, and never interrupts a communication thread in the middle of a system call (2-process
    gloo runs stopped by SIGTERM aborted now and then with "terminate called without an active exception").
    Signals arriving meanwhile stay pending and are delivered when the mask is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def teardown(ctx: DistContext) -> None:
    """Leave the process group if init_distributed created it, so that its communication threads stop."""
    if ctx.owns_group and dist.is_initialized():
        drop_dtensor_caches()
        dist.destroy_process_group()


# DTensor's module-level caches whose keys hold a device mesh, as (module, dotted name of the function that empties
# it). Private torch names (torch 2.13): tests/integration/test_two_process_collectives.py checks that no thread
# is left.
DTENSOR_CACHE_CLEARERS = (
    ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
    ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
    ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
    ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
)


def cache_clearer(module: str, name: str):
    """The function `module`.`name` (a dotted attribute path), or None when this torch does not have it."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        return None
    for part in name.split("."):
        found = getattr(found, part, None)
        if found is None:
            return None
    return found


def drop_dtensor_caches() -> None:
    """Empty DTensor's module-level caches (sharding propagation, redistribution plans, mesh topology): their keys
    keep FSDP2's device mesh, and through it the process group, alive after destroy_process_group (torch 2.13). Its
    gloo threads then run until interpreter exit, the likely cause of the rare 2-process abort "terminate called
    without an active exception". A cache this torch lacks is named in a warning: the run itself is finished, so
    teardown does not fail over it."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor was made
        return
    missing = []
    for module, name in DTENSOR_CACHE_CLEARERS:
        clear = cache_clearer(module, name)
        if clear is None:
            missing.append(f"{module}.{name}")
        else:
            clear()
    if missing:
        warnings.warn(f"teardown: torch {torch.__version__} has no {', '.join(missing)}, so those DTensor caches "
                      "were not emptied and may keep the process group's threads alive until exit (mrgfast clears "
                      "them for torch 2.13); a rare 'terminate called without an active exception' at exit is the "
                      "symptom", RuntimeWarning, stacklevel=2)


def is_main_process() -> bool:
    """Whether this process is rank 0 (true without a process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for one process)."""
    if ctx.distributed:
        dist.barrier()


def all_reduce_mean(ctx: DistContext, values: dict[str, Tensor]) -> dict[str, Tensor]:
    """The mean over ranks of each 0-d metric tensor, in one collective; unchanged for one process."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys]).to(ctx.device)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= ctx.world_size
    return {k: stacked[i] for i, k in enumerate(keys)}


def all_reduce_sum(ctx: DistContext, tensor: Tensor) -> Tensor:
    """The sum over ranks of `tensor` (e.g. token counts for normalising the loss); a copy for one process."""
    out = tensor.detach().clone()
    if ctx.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(ctx: DistContext, tensor: Tensor) -> Tensor:
    """The element-wise maximum of `tensor` over ranks (a copy); the tensor itself for one process."""
    out = tensor.detach().clone()
    if ctx.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """Whether `flag` is true on any rank (e.g. a SIGTERM seen by one process stops all)."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(ctx: DistContext, obj: Any) -> list:
    """Every rank's `obj` (e.g. RNG states for a checkpoint), in rank order; [obj] for one process."""
    if not ctx.distributed:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, ctx: DistContext, strategy: str = "ddp",
               fsdp_blocks: Optional[Iterable[nn.Module]] = None) -> nn.Module:
    """DDP- or FSDP2-wrap `model` for data parallelism; the model itself for one process.

    FSDP2 (`fully_shard`) shards each module in `fsdp_blocks` (e.g. the decoder layers) and then the root.
    Frozen parameters are fine in both: DDP reduces only gradients that exist.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not ctx.distributed:
        return model
    if strategy == "ddp":
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in fsdp_blocks or ():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce inside the block when not `enabled` (all but the last accumulation micro-step)."""
    if enabled:
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield

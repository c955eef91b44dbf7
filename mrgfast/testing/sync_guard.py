"""no_host_sync(): raise on any device->host synchronisation inside a region (proves a step is graph-capturable).

On CUDA these operations make the CPU wait for the GPU, and a CUDA graph cannot capture them; on CPU they
are free, so a CPU test would never notice them. The guard sees every aten op (a TorchDispatchMode) and
patches the Python-level ways of reading tensor data that never reach the dispatcher (`tolist`, `numpy`,
`cpu`, `torch.cuda.synchronize`, ...). It is thread-local: other threads are not affected.
"""

import contextlib
import functools
import threading
from typing import Iterable, Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

# aten op (overload packet name) -> what Python code usually triggers it, and the sync-free alternative.
SYNC_OPS = {
    "_local_scalar_dense": "Tensor.item() / int() / float() / bool() / `if tensor` / a tensor used as a Python "
                           "index; keep the value as a tensor (torch.where, clamp, masked_fill)",
    "is_nonzero": "bool(tensor) / `if tensor`; keep the condition as a tensor (torch.where)",
    "equal": "torch.equal returns a Python bool; compare with (a == b).all() and keep the tensor",
    "allclose": "torch.allclose returns a Python bool; use torch.isclose(...).all() and keep the tensor",
    "nonzero": "nonzero / torch.where(cond) / argwhere have data-dependent shapes; use nonzero_static or masks",
    "nonzero_numpy": "torch.where(cond) with one argument; use torch.where(cond, a, b) or masks",
    "argwhere": "argwhere has a data-dependent shape; use masks",
    "masked_select": "masked_select has a data-dependent shape; use masked_fill / multiplication by the mask",
    "unique": "unique has a data-dependent shape",
    "_unique": "unique has a data-dependent shape",
    "_unique2": "unique has a data-dependent shape",
    "unique_dim": "unique has a data-dependent shape",
    "unique_consecutive": "unique_consecutive has a data-dependent shape",
    "unique_dim_consecutive": "unique_consecutive has a data-dependent shape",
    "bincount": "bincount's length depends on the data; use scatter_add_ into a fixed-size tensor",
    "_linalg_check_errors": "linalg error checks read the result on the host; use the *_ex variants",
}
# Ops that synchronise only with some arguments: a check on (op overload, args, kwargs) -> reason or None.
BOOL_INDEX = "indexing with a boolean mask has a data-dependent shape; use torch.where / masked_fill"


def bool_index_reason(func, args, kwargs):
    """The reason aten.index / index_put with a boolean mask synchronises, or None for integer indices."""
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    if any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
        return BOOL_INDEX
    return None


def repeat_interleave_reason(func, args, kwargs):
    """Reason when repeat_interleave has tensor repeats and no output_size (its length is read on the host)."""
    if func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None:
        return "repeat_interleave with tensor repeats reads their sum on the host; pass output_size="
    return None


CONDITIONAL_OPS = {
    "index": bool_index_reason,
    "index_put": bool_index_reason,
    "index_put_": bool_index_reason,
    "_index_put_impl_": bool_index_reason,
    "repeat_interleave": repeat_interleave_reason,
}


class HostSyncError(RuntimeError):
    """A device->host synchronisation happened inside a no_host_sync() region; the message names the op."""


def sync_error(what: str, reason: str) -> HostSyncError:
    """The error for `what` (an op or method name) with the reason and sync-free alternative."""
    return HostSyncError(f"host synchronisation inside a sync-free region: {what} ({reason}). On CUDA this "
                         "stalls the CPU on the GPU and cannot be captured in a CUDA graph")


class SyncDetector(TorchDispatchMode):
    """Dispatch mode that raises HostSyncError on aten ops that synchronise with the host."""

    def __init__(self, allow: frozenset):
        super().__init__()
        self.allow = allow

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if f"aten.{name}" not in self.allow:
            reason = SYNC_OPS.get(name)
            if reason is None and name in CONDITIONAL_OPS:
                reason = CONDITIONAL_OPS[name](func, args, kwargs)
            if reason is not None:
                raise sync_error(f"aten.{name}", reason)
        return func(*args, **kwargs)


# Python-level entry points that read tensor data without an aten op the dispatch mode would see.
METHOD_REASONS = {
    "tolist": "Tensor.tolist() copies the data to Python; keep it as a tensor",
    "numpy": "Tensor.numpy() copies the data to the host",
    "cpu": "Tensor.cpu() copies device data to the host; on CUDA it waits for the GPU",
}
CUDA_SYNC_FUNCTIONS = ("synchronize",)
CUDA_SYNC_METHODS = (("Stream", "synchronize"), ("Event", "synchronize"))

_active = threading.local()
_patch_lock = threading.Lock()
_patch_users = 0
_originals: dict = {}


def guarded_here(name: str) -> bool:
    """Whether this thread is inside a no_host_sync() region that does not allow `name` (nested regions:
    every enclosing one must allow it, as each one's dispatch mode checks too)."""
    return any(name not in allow for allow in getattr(_active, "stack", ()))


def guard_method(owner, attr: str, label: str, reason: str, check=None):
    """A wrapper of owner.attr that raises in a guarded thread (when `check(args, kwargs)` says so)."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if guarded_here(label) and (check is None or check(args, kwargs)):
            raise sync_error(label, reason)
        return original(*args, **kwargs)
    return original, wrapper


def to_host_check(args, kwargs) -> bool:
    """Whether Tensor.to(...) moves a non-CPU tensor to the CPU synchronously (a CPU->CPU .to is a no-op)."""
    tensor = args[0]
    target = kwargs.get("device")
    for arg in args[1:]:
        if isinstance(arg, (str, torch.device)):
            target = arg
    return (target is not None and torch.device(target).type == "cpu" and tensor.device.type != "cpu"
            and not kwargs.get("non_blocking", False))


def patch_targets():
    """(owner, attribute, label, reason, check) for every Python-level patch."""
    targets = [(Tensor, m, f"Tensor.{m}", r, None) for m, r in METHOD_REASONS.items()]
    targets.append((Tensor, "to", "Tensor.to(cpu)", "a blocking copy of device data to the host", to_host_check))
    for name in CUDA_SYNC_FUNCTIONS:
        targets.append((torch.cuda, name, f"torch.cuda.{name}", "waits for the GPU", None))
    for cls, method in CUDA_SYNC_METHODS:
        owner = getattr(torch.cuda, cls)
        targets.append((owner, method, f"torch.cuda.{cls}.{method}", "waits for the GPU", None))
    return targets


def install_patches() -> None:
    """Install the Python-level patches (reference-counted across threads and nested guards)."""
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            for owner, attr, label, reason, check in patch_targets():
                original, wrapper = guard_method(owner, attr, label, reason, check)
                _originals[(owner, attr)] = original
                setattr(owner, attr, wrapper)
        _patch_users += 1


def remove_patches() -> None:
    """Undo install_patches() once the last guard exits."""
    global _patch_users
    with _patch_lock:
        _patch_users -= 1
        if _patch_users == 0:
            for (owner, attr), original in _originals.items():
                setattr(owner, attr, original)
            _originals.clear()


@contextlib.contextmanager
def no_host_sync(allow: Iterable[str] = ()) -> Iterator[None]:
    """Raise HostSyncError on any host synchronisation in this thread inside the block.

    `allow` names exceptions: aten ops as 'aten.<name>' (e.g. 'aten.nonzero') or methods as in the error
    message (e.g. 'Tensor.cpu').
    """
    allowed = frozenset(allow)
    if not hasattr(_active, "stack"):
        _active.stack = []
    install_patches()
    _active.stack.append(allowed)
    try:
        with SyncDetector(allowed):
            yield
    finally:
        _active.stack.pop()
        remove_patches()

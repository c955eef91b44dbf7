"""Capture the whole training step (forward + backward + optimizer) in one CUDA graph and replay it.

`StepRunner(fn)` calls `fn(inputs)` where `inputs` is a list of PackedBatch-like objects plus tensors. On CPU
(the eager twin) it just calls fn. On CUDA it runs `warmup` eager steps on a side stream, then captures fn on
static copies of the input tensors and replays the graph, copying each new batch into those buffers. A graph
bakes in everything host-side (shapes, document bounds, spans), so each input's host `signature` must match
the captured one; a step whose signature differs runs eagerly and is counted in `eager_steps` (logged), never
silently. train() feeds it static batches (mrgfast.data.static_batch.make_static: fixed-size document bounds,
images and slot indices, no host values; mrgfast.data.static_dpo.make_static_dpo for DPO), whose signatures are all
equal, so every step after the warm-up replays.
"""

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import Tensor

# PackedBatch fields the step never computes with (bookkeeping for logs and the NaN guard): not part of a
# graph's signature, so batches that differ only in them replay the same graph.
BOOKKEEPING = frozenset({"sample_ids", "num_tokens", "truncated"})


def tensors_of(obj) -> list:
    """Every tensor inside `obj` (dataclasses, lists, tuples, dicts), in a fixed order."""
    if isinstance(obj, Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in tensors_of(getattr(obj, f.name))]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors_of(item)]
    if isinstance(obj, dict):
        return [t for key in sorted(obj, key=str) for t in tensors_of(obj[key])]
    return []


def signature(obj) -> Any:
    """What a graph bakes in about `obj`: tensor shapes/dtypes and every host-side value."""
    if isinstance(obj, Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj).__name__,) + tuple((f.name, signature(getattr(obj, f.name)))
                                             for f in dataclasses.fields(obj) if f.name not in BOOKKEEPING)
    if isinstance(obj, (list, tuple)):
        return tuple(signature(item) for item in obj)
    if isinstance(obj, dict):
        return tuple((str(k), signature(obj[k])) for k in sorted(obj, key=str))
    return obj


def copy_into(static, new) -> None:
    """Copy every tensor of `new` into the matching tensor of `static` (same signature)."""
    with torch.no_grad():
        for dst, src in zip(tensors_of(static), tensors_of(new)):
            dst.copy_(src, non_blocking=True)


def clone_tensors(obj):
    """A deep copy of `obj` with private tensor storage (the graph's static input buffers)."""
    if isinstance(obj, Tensor):
        return obj.clone()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: clone_tensors(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, list):
        return [clone_tensors(item) for item in obj]
    if isinstance(obj, tuple):
        return tuple(clone_tensors(item) for item in obj)
    if isinstance(obj, dict):
        return {k: clone_tensors(v) for k, v in obj.items()}
    return obj


class StepRunner:
    """Runs a step function eagerly (CPU, or `enabled=False`) or through one captured CUDA graph."""

    def __init__(self, fn: Callable[[Any], dict], device: torch.device, enabled: bool = True, warmup: int = 3):
        self.fn, self.device = fn, torch.device(device)
        self.enabled = enabled and self.device.type == "cuda"
        self.warmup = warmup
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.key = None
        self.static_inputs = None
        self.static_outputs: Optional[dict] = None
        self.seen = 0
        self.replays = 0
        self.eager_steps = 0

    def __call__(self, inputs) -> dict:
        """One step on `inputs`; returns fn's outputs (device tensors, valid until the next call when graphed)."""
        if not self.enabled:
            return self.fn(inputs)
        key = signature(inputs)
        if self.graph is not None and key == self.key:
            copy_into(self.static_inputs, inputs)
            self.graph.replay()
            self.replays += 1
            return self.static_outputs
        if self.graph is None and (self.key is None or key == self.key):
            self.key = key
            self.seen += 1
            if self.seen > self.warmup:
                return self.capture(inputs)
        self.eager_steps += 1
        return self.on_side_stream(inputs)

    def on_side_stream(self, inputs) -> dict:
        """An eager step on a side stream (as torch's capture recipe warms up)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self.fn(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def capture(self, inputs) -> dict:
        """Record fn on static copies of `inputs`, then replay once to actually take this step."""
        self.static_inputs = clone_tensors(inputs)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph):
            self.static_outputs = self.fn(self.static_inputs)
        self.graph = graph
        graph.replay()
        self.replays += 1
        return self.static_outputs

    def stats(self) -> dict:
        """Replay and eager counts for the metrics log."""
        return {"graph_replays": self.replays, "graph_eager_steps": self.eager_steps} if self.enabled else {}

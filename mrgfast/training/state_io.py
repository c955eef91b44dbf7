"""Nested training state (optimizer/scheduler state_dicts, RNG, sampler) as JSON + safetensors, never pickle."""

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

# Markers in the JSON for what JSON itself cannot hold; a user dict key starting with "__" is stored as items.
TENSOR, TUPLE, ITEMS, FLOAT = "__tensor__", "__tuple__", "__items__", "__float__"


def flatten_state(obj: Any, path: str = "state") -> tuple[Any, dict[str, Tensor]]:
    """`obj` as a JSON-ready structure whose tensors are replaced by keys into the returned tensor dict."""
    tensors: dict[str, Tensor] = {}
    return encode(obj, path, tensors), tensors


def encode(obj: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """One value of flatten_state: tensors out by key, tuples / non-string-keyed dicts / non-finite floats tagged."""
    if isinstance(obj, Tensor):
        # A private contiguous CPU copy: safetensors refuses shared or strided storage.
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {TENSOR: path}
    if isinstance(obj, np.generic):
        obj = obj.item()  # numpy scalars (e.g. from a sampler) as the Python number they hold
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        # JSON has no nan/inf; repr() round-trips a float exactly.
        return obj if math.isfinite(obj) else {FLOAT: repr(obj)}
    if isinstance(obj, tuple):
        return {TUPLE: [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {ITEMS: [[encode(k, f"{path}/key{i}", tensors), encode(v, f"{path}/{k}", tensors)]
                        for i, (k, v) in enumerate(obj.items())]}
    raise ValueError(f"{path}: cannot store a {type(obj).__name__} in a checkpoint "
                     "(expected tensors, numbers, strings, None, lists, tuples or dicts)")


def unflatten_state(data: Any, tensors: dict[str, Tensor], source: str) -> Any:
    """The inverse of flatten_state; ValueError naming `source` when a referenced tensor is missing."""
    if isinstance(data, list):
        return [unflatten_state(v, tensors, source) for v in data]
    if not isinstance(data, dict):
        return data
    if TENSOR in data:
        key = data[TENSOR]
        if key not in tensors:
            raise ValueError(f"{source}: tensor {key!r} is referenced but missing from the safetensors file")
        return tensors[key]
    if FLOAT in data:
        return float(data[FLOAT])
    if TUPLE in data:
        return tuple(unflatten_state(v, tensors, source) for v in data[TUPLE])
    if ITEMS in data:
        return {unflatten_state(k, tensors, source): unflatten_state(v, tensors, source) for k, v in data[ITEMS]}
    return {k: unflatten_state(v, tensors, source) for k, v in data.items()}


def write_state(directory: Path, name: str, obj: Any) -> list[str]:
    """Write `obj` as `<name>.json` plus its tensors as `<name>.safetensors`; returns the file names."""
    data, tensors = flatten_state(obj)
    files = [f"{name}.json", f"{name}.safetensors"]
    (directory / files[0]).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    save_file(tensors, str(directory / files[1]), metadata={"format": "pt"})
    return files


def read_state(directory: Path, name: str) -> Any:
    """Read what write_state wrote; ValueError naming the file when it is missing or unreadable."""
    json_file, tensor_file = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not json_file.is_file():
        raise ValueError(f"{json_file}: missing; the checkpoint is incomplete")
    try:
        data = json.loads(json_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{json_file}: not valid JSON ({err})") from err
    return unflatten_state(data, load_tensors(tensor_file), str(json_file))


def load_tensors(file: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors on CPU; ValueError naming the file when it is missing or corrupt."""
    if not file.is_file():
        raise ValueError(f"{file}: missing; the checkpoint is incomplete")
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from err


def save_tensors(tensors: dict[str, Tensor], file: Path) -> None:
    """Write named tensors as safetensors (private contiguous CPU copies)."""
    bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{file.name}: values must be tensors; {bad[0]!r} is a {type(tensors[bad[0]]).__name__}")
    copies = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    save_file(copies, str(file), metadata={"format": "pt"})


def raw_bytes(t: Tensor) -> Tensor:
    """A tensor's values as a flat uint8 tensor (so -0.0 differs from 0.0 and equal NaNs compare equal)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same_state(a: Any, b: Any) -> bool:
    """Whether two nested states are identical, tensors compared bitwise (dtype, shape and values)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(raw_bytes(a), raw_bytes(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b
